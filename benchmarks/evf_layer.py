"""Benchmark one Elastic Vision FFN layer against a dense FFN and DeepSpeed's top-1 MoE layer, on CPU.

Measures wall time (median of N repeats after warm-up) and peak memory of a single layer at hidden size 576 and
FFN intermediate size 1536 (SmolLM2-135M's sizes), batch 1 x T tokens, fp32, for

- `dense`: transformers `LlamaMLP` (the FFN every decoder layer has);
- `evf`: `eve_vlm.model.evf.ElasticVisionFFN` (2 experts, top-1, `img_gbpr` allocation), gather/scatter
  dispatch (`index_select` / `index_add_`), language FFN frozen as expert 0;
- `deepspeed`: `deepspeed.moe.layer.MoE` (2 experts, k=1, ep_size=1, RTS) from the installed DeepSpeed, single
  process on CPU (gloo, world size 1). Recent DeepSpeed releases dispatch by index gather, not by one-hot
  einsum;
- `deepspeed-einsum`: a re-implementation of DeepSpeed 0.9.5's top-1 MoE (`top1gating` + one-hot
  `sec,sm->ecm` / `sec,ecm->sm` einsum dispatch), the version MoE-LLaVA and Eve pin; its dispatch costs
  O(S * E * C * D) with capacity C ~ S, i.e. quadratic in the number of tokens S. Pure torch, no DeepSpeed
  needed.

All MoE layers get the same FFN weights (both experts are copies of the same `LlamaMLP`), the same router
weights, capacity factor 1.5 (train) / 2.0 (eval), min capacity 4, and expert 0 frozen (Eve stage 3); the
dense FFN is fully trainable. The image mask marks 75% of the tokens as one image block (1/8 text before it,
1/8 after), a realistic VLM prompt; with no image token the EVF would take its text-only shortcut.
Modes: `fwd` = eval mode under `torch.inference_mode()`; `fwd_bwd` = train mode, input requiring grad, loss
`out.sum() + 0.01 * aux_loss`, backward, gradients dropped before the next step.

Timing: for each (tokens, mode) one subprocess builds all layers, warms each up, then runs N rounds; round r
runs every layer once, starting at layer r mod n, so a change in machine load hits every layer alike (the
machine may be shared). `ms` is the median over the rounds, `ms_min` the minimum. `torch.set_num_threads(2)`
(`--threads`).
Peak memory: for each case (layer, tokens, mode) a fresh subprocess builds the layer and its input, then runs
one step; peak_mb is the process's peak resident set size during that step minus its resident size just before
it. The kernel's peak counter is reset through `/proc/self/clear_refs` where allowed (`mem_method:
vmhwm-reset`), else `ru_maxrss` delta (`ru_maxrss-delta`, which can under-read when setup peaked higher).
Output: one JSON line per case, then one line of ratios (EVF's time and peak memory divided by each other
layer's). Timings depend on the machine (CPU, BLAS, threads) and on whatever else runs on it: each record
carries the 1-minute load average before and after its timing rounds (`load_1m`); on a 2-core machine a load
above ~2 means the layers shared the CPU with something else, and then 2 OpenMP threads mostly measure
threads waiting for each other (`--threads 1` is steadier there). Compare numbers only from one run on one
idle machine.

Run it from the repository root, in its own venv so DeepSpeed stays out of the project's environment (CPU
torch only):

    python3 -m venv .bench-venv && source .bench-venv/bin/activate
    pip install torch==2.13.0     # the CPU wheel first; never let pip pull a CUDA torch or torchvision
    pip install deepspeed -e .    # DeepSpeed, and eve_vlm with its dependencies (transformers, peft, pillow...)
    pip list | grep -i torch      # must still show 2.13.0+cpu and no torchvision
    python benchmarks/evf_layer.py           # 4 layers x 512/2048/8192 tokens x 2 modes, ~7 min on 2 cores
    python benchmarks/evf_layer.py --tokens 512 --repeats 3 --layers dense evf
    python benchmarks/evf_layer.py --check   # parity: every MoE layer equals p * FFN(x) here; no timing

Without DeepSpeed installed the `deepspeed` layer is skipped with a printed reason; `deepspeed-einsum` needs only
torch. The script puts the repository root on `sys.path`, so an uninstalled checkout works too once eve_vlm's
dependencies are installed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
HIDDEN_SIZE = 576
INTERMEDIATE_SIZE = 1536
NUM_EXPERTS = 2
CAPACITY_FACTOR = 1.5
EVAL_CAPACITY_FACTOR = 2.0
MIN_CAPACITY = 4
ROUTER_STD = 0.02
AUX_WEIGHT = 0.01
THREADS = 2
MODES = ("fwd", "fwd_bwd")
CASE_TIMEOUT_S = 600

# A step returns the layer output [B, T, D], the aux loss (or None) and the tokens routed to each expert.
Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None, list[int] | None]]


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- DeepSpeed 0.9.5 top-1 MoE, re-implemented


def top1gating_095(logits: Tensor, capacity_factor: float, min_capacity: int) -> tuple[Tensor, ...]:
    """DeepSpeed 0.9.5 `sharded_moe.top1gating` with its defaults (no noise, drop_tokens, RTS, no tutel).

    Args:
        logits: [S, E] fp32 router logits.

    Returns:
        l_aux (0-dim), combine_weights [S, E, C] fp32, dispatch_mask [S, E, C] bool, exp_counts [E] (on CPU).
    """
    gates = F.softmax(logits, dim=1)  # (S, E)
    num_tokens, num_experts = gates.shape
    capacity = max(int(torch.ceil(torch.tensor(num_tokens / num_experts * capacity_factor))), min_capacity)
    indices1_s = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(indices1_s, num_classes=num_experts)  # (S, E)
    exp_counts = torch.sum(mask1, dim=0).detach().to("cpu")
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.sum(me * ce) * num_experts
    mask1_rand = mask1 * torch.rand(mask1.shape, device=logits.device)  # random token selection
    assert num_tokens >= min_capacity, "fewer tokens than min_capacity"
    top_idx = torch.topk(mask1_rand, k=capacity, dim=0)[1]  # (C, E)
    mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations1_s = torch.sum(locations1 * mask1, dim=1)  # (S,)
    gates = gates * mask1.float()
    locations1_sc = F.one_hot(locations1_s, num_classes=capacity).float()  # (S, C)
    combine_weights = torch.einsum("se,sc->sec", gates, locations1_sc)  # (S, E, C)
    dispatch_mask = combine_weights.bool()
    return l_aux, combine_weights, dispatch_mask, exp_counts


class EinsumTop1MoE(nn.Module):
    """DeepSpeed 0.9.5 `MoE` (k=1, ep_size=1, no residual, no tutel) on one process: `TopKGate` + `MOELayer`
    + `Experts`, dispatch and combine by one-hot einsum over [S, E, C].

    Shape letters: S tokens, E experts, C capacity, M = D model size.
    """

    def __init__(
        self,
        *,
        expert: nn.Module,
        hidden_size: int,
        num_experts: int,
        capacity_factor: float,
        eval_capacity_factor: float,
        min_capacity: int,
    ) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False).float()
        self.experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_experts))
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d_model = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, d_model)  # (S, M)
        logits = self.wg(x.float())  # (S, E)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        l_aux, combine_weights, dispatch_mask, exp_counts = top1gating_095(logits, factor, self.min_capacity)
        dispatched = torch.einsum("sec,sm->ecm", dispatch_mask.type_as(x), x)  # (E, C, M)
        dispatched = dispatched.reshape(1, self.num_experts, -1, d_model)  # ecm -> gecm, g = ep_size = 1
        chunks = dispatched.chunk(self.num_experts, dim=1)
        expert_output = torch.cat(
            [ffn(chunk) for chunk, ffn in zip(chunks, self.experts, strict=True)], dim=1
        )
        expert_output = expert_output.reshape(self.num_experts, -1, d_model)  # (E, C, M)
        combined = torch.einsum("sec,ecm->sm", combine_weights.type_as(x), expert_output)  # (S, M)
        return combined.reshape(hidden_states.shape), l_aux, exp_counts


# ---------------------------------------------------------------------------------------- building the layers


def make_ffn() -> nn.Module:
    """SmolLM2-135M-sized `LlamaMLP`, seeded so every layer starts from the same weights."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN_SIZE, intermediate_size=INTERMEDIATE_SIZE, hidden_act="silu")
    return LlamaMLP(config)


def router_weight() -> Tensor:
    """[E, D] router weight shared by all MoE layers (EVF's init: N(0, 0.02^2))."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(NUM_EXPERTS, HIDDEN_SIZE, generator=generator) * ROUTER_STD


def make_inputs(tokens: int) -> tuple[Tensor, Tensor]:
    """hidden_states [1, T, D] ~ N(0, 1) and image_mask [1, T]: one image block over the middle 3/4."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, tokens, HIDDEN_SIZE, generator=generator)
    image_mask = torch.zeros(1, tokens, dtype=torch.bool)
    image_mask[:, tokens // 8 : tokens // 8 + 3 * tokens // 4] = True
    return x, image_mask


def init_distributed() -> None:
    """Single-process gloo group, as DeepSpeed's MoE layer needs torch.distributed."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    dist.init_process_group("gloo", rank=0, world_size=1)


def _build_dense(ffn: nn.Module) -> tuple[nn.Module, Step, str]:
    return ffn, lambda x, mask: (ffn(x), None, None), f"transformers-{_version('transformers')}-LlamaMLP"


def _build_evf(ffn: nn.Module) -> tuple[nn.Module, Step, str]:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from eve_vlm.model.evf import ElasticVisionFFN

    evf = ElasticVisionFFN(
        language_ffn=ffn,
        hidden_size=HIDDEN_SIZE,
        num_experts=NUM_EXPERTS,
        top_k=1,
        allocation="img_gbpr",
        capacity_factor=CAPACITY_FACTOR,
        eval_capacity_factor=EVAL_CAPACITY_FACTOR,
        min_capacity=MIN_CAPACITY,
    )
    with torch.no_grad():
        evf.router.weight.copy_(router_weight())

    def step(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None, list[int] | None]:
        out = evf.route(x, mask)
        return out.hidden_states, out.aux_loss, out.stats.tokens_per_expert.tolist()

    return evf, step, "eve_vlm-ElasticVisionFFN-img_gbpr"


def _build_deepspeed(ffn: nn.Module) -> tuple[nn.Module, Step, str]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed()
    from deepspeed.moe.layer import MoE

    moe = MoE(
        hidden_size=HIDDEN_SIZE,
        expert=ffn,
        num_experts=NUM_EXPERTS,
        ep_size=1,
        k=1,
        capacity_factor=CAPACITY_FACTOR,
        eval_capacity_factor=EVAL_CAPACITY_FACTOR,
        min_capacity=MIN_CAPACITY,
        use_residual=False,
    )
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(router_weight())
    moe.deepspeed_moe.experts.deepspeed_experts[0].requires_grad_(False)  # the language expert, as in EVF
    return moe, _moe_step(moe), f"deepspeed-{_version('deepspeed')}"


def _build_einsum(ffn: nn.Module) -> tuple[nn.Module, Step, str]:
    moe = EinsumTop1MoE(
        expert=ffn,
        hidden_size=HIDDEN_SIZE,
        num_experts=NUM_EXPERTS,
        capacity_factor=CAPACITY_FACTOR,
        eval_capacity_factor=EVAL_CAPACITY_FACTOR,
        min_capacity=MIN_CAPACITY,
    )
    with torch.no_grad():
        moe.wg.weight.copy_(router_weight())
    moe.experts[0].requires_grad_(False)  # the language expert, as in EVF
    return moe, _moe_step(moe), "reimpl-0.9.5"


def _moe_step(moe: nn.Module) -> Step:
    """Step of a DeepSpeed-style layer, which returns `(out, l_aux, exp_counts)` and ignores the image mask."""

    def step(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None, list[int] | None]:
        out, l_aux, exp_counts = moe(x)
        return out, l_aux, exp_counts.tolist()

    return step


BUILDERS: dict[str, Callable[[nn.Module], tuple[nn.Module, Step, str]]] = {
    "dense": _build_dense,
    "evf": _build_evf,
    "deepspeed": _build_deepspeed,
    "deepspeed-einsum": _build_einsum,
}
LAYERS = tuple(BUILDERS)


def build(layer: str) -> tuple[nn.Module, Step, str]:
    """Return the module, a step `(x, image_mask) -> (out, aux, tokens_per_expert)` and an impl label."""
    if layer not in BUILDERS:
        raise ValueError(f"unknown layer {layer!r}; choose from {list(LAYERS)}")
    return BUILDERS[layer](make_ffn())


# ------------------------------------------------------------------------------------------- memory, timing


def _status_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


class PeakMemory:
    """Peak resident memory above the level at `start()`: VmHWM after resetting it, else ru_maxrss delta."""

    def start(self) -> None:
        gc.collect()
        self.method = "ru_maxrss-delta"
        self.base = _maxrss_mb()
        rss = _status_mb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            return
        if rss is not None and _status_mb("VmHWM") is not None:
            self.method, self.base = "vmhwm-reset", rss

    def peak_mb(self) -> float:
        peak = _status_mb("VmHWM") if self.method == "vmhwm-reset" else _maxrss_mb()
        return max(peak - self.base, 0.0)


class Case:
    """One layer and its input in one mode, ready to run steps."""

    def __init__(self, layer: str, tokens: int, mode: str) -> None:
        self.layer = layer
        self.module, self._step, self.impl = build(layer)
        self.x, self.image_mask = make_inputs(tokens)
        self.training = mode == "fwd_bwd"
        self.module.train(self.training)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.routed: list[int] | None = None
        if self.training:
            self.x.requires_grad_(True)

    def run(self) -> float:
        """One inference (`fwd`) or training (`fwd_bwd`) step; returns its wall time in ms."""
        start = time.perf_counter()
        if not self.training:
            with torch.inference_mode():
                _, _, self.routed = self._step(self.x, self.image_mask)
            return (time.perf_counter() - start) * 1000
        out, aux, self.routed = self._step(self.x, self.image_mask)
        loss = out.sum() if aux is None else out.sum() + AUX_WEIGHT * aux
        loss.backward()
        self.x.grad = None
        for p in self.params:
            p.grad = None
        return (time.perf_counter() - start) * 1000


def measure_memory(layer: str, tokens: int, mode: str) -> dict:
    """Peak memory of one step of a freshly built layer (run this in a fresh process)."""
    case = Case(layer, tokens, mode)
    memory = PeakMemory()
    memory.start()
    case.run()
    return {
        "layer": layer,
        "impl": case.impl,
        "peak_mb": round(memory.peak_mb(), 1),
        "mem_method": memory.method,
        "trainable_params": sum(p.numel() for p in case.params),
        "tokens_per_expert": case.routed,
    }


def time_layers(layers: list[str], tokens: int, mode: str, repeats: int, warmup: int) -> list[dict]:
    """Time all layers in one process, interleaved: round r runs every layer once, starting at layer r mod n,
    so a change in machine load hits every layer alike. Returns one record per layer."""
    cases, records = [], []
    for layer in layers:
        try:
            case = Case(layer, tokens, mode)
            for _ in range(warmup):
                case.run()
            cases.append(case)
        except Exception as error:  # report the failing layer, time the others
            records.append({"layer": layer, "error": f"{type(error).__name__}: {error}"})
    times: dict[str, list[float]] = {case.layer: [] for case in cases}
    load_before = os.getloadavg()[0]
    for round_ in range(repeats):
        start = round_ % max(len(cases), 1)
        for case in cases[start:] + cases[:start]:
            times[case.layer].append(case.run())
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    for layer, samples in times.items():
        stats = {"ms": statistics.median(samples), "ms_min": min(samples), "ms_max": max(samples)}
        records.append({"layer": layer, **{k: round(v, 3) for k, v in stats.items()}, "load_1m": load})
    return records


# ------------------------------------------------------------------------------------------------ the driver


def skip_reason(layer: str) -> str | None:
    """Why `layer` cannot run here, or None."""
    if layer == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not importable in this environment (pip install deepspeed; see the docstring)"
    if layer == "evf":
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        try:
            importlib.import_module("eve_vlm.model.evf")
        except ImportError as error:
            return f"eve_vlm.model.evf does not import: {error}"
    return None


def run_child(args: list[str]) -> list[dict] | str:
    """Run this script with `args` in a fresh process; its JSON lines, or an error message."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *args,
        "--threads",
        str(torch.get_num_threads()),
    ]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"timed out after {CASE_TIMEOUT_S} s"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"layer"')]
    if proc.returncode != 0 or not records:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"exit {proc.returncode}: " + " | ".join(tail)
    return records


def measure(layers: list[str], tokens: int, mode: str, repeats: int, warmup: int) -> list[dict]:
    """Timing (one process, interleaved) and memory (one fresh process per layer) of every layer."""
    timed = run_child(
        ["--_time", str(tokens), mode, *layers, "--repeats", str(repeats), "--warmup", str(warmup)]
    )
    timing = {r["layer"]: r for r in timed} if isinstance(timed, list) else {}
    records = []
    for layer in layers:
        memory = run_child(["--_memory", layer, str(tokens), mode])
        time_rec = timing.get(layer, {"error": timed if isinstance(timed, str) else "no timing record"})
        if isinstance(memory, str) or "error" in time_rec:
            error = time_rec.get("error") or f"memory: {memory}"
            records.append({"layer": layer, "tokens": tokens, "mode": mode, "error": error})
            continue
        memory = memory[0]
        record = {"layer": layer, "impl": memory["impl"], "tokens": tokens, "mode": mode}
        # What `mode` means for the module: `fwd` is inference (eval mode, the eval capacity factor: with two
        # experts nothing is dropped), `fwd_bwd` is training (train mode, the training capacity factor drops).
        train = mode == "fwd_bwd"
        record |= {
            "module_mode": "train" if train else "eval",
            "capacity_factor": CAPACITY_FACTOR if train else EVAL_CAPACITY_FACTOR,
        }
        record |= {k: time_rec[k] for k in ("ms", "ms_min", "ms_max")} | {"peak_mb": memory["peak_mb"]}
        record |= {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "deepspeed": _version("deepspeed"),
        }
        record |= {"repeats": repeats, "warmup": warmup, "load_1m": time_rec["load_1m"]}
        record |= {k: memory[k] for k in ("mem_method", "trainable_params", "tokens_per_expert")}
        records.append(record)
    return records


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(records: list[dict]) -> list[dict]:
    """EVF's ms (median), ms_min and peak_mb divided by each other layer's, per (tokens, mode)."""
    table = {(r["layer"], r["tokens"], r["mode"]): r for r in records if "ms" in r}
    rows = []
    for (layer, tokens, mode), evf in table.items():
        if layer != "evf":
            continue
        row = {"tokens": tokens, "mode": mode}
        for other in ("dense", "deepspeed", "deepspeed-einsum"):
            ref = table.get((other, tokens, mode))
            if ref is not None:
                row[f"evf/{other}"] = {key: _ratio(evf[key], ref[key]) for key in ("ms", "ms_min", "peak_mb")}
        rows.append(row)
    return rows


def parity_check(tokens: int = 512) -> None:
    """Eval mode, nothing dropped, both experts = the same FFN: every MoE output must equal p_max * FFN(x)."""
    x, image_mask = make_inputs(tokens)
    probs = F.linear(x.reshape(-1, HIDDEN_SIZE), router_weight()).softmax(-1).max(-1).values
    with torch.inference_mode():
        expected = make_ffn()(x) * probs.view(1, tokens, 1)
        for layer in LAYERS[1:]:
            reason = skip_reason(layer)
            if reason:
                print(json.dumps({"check": layer, "skipped": reason}))
                continue
            module, step, impl = build(layer)
            module.eval()
            out, _, routed = step(x, image_mask)
            error = (out - expected).abs().max().item()
            print(
                json.dumps(
                    {
                        "check": layer,
                        "impl": impl,
                        "max_abs_err": error,
                        "ok": error < 1e-5,
                        "tokens_per_expert": routed,
                    }
                )
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192], help="sequence lengths T")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per case (median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case before timing")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS, help="layers to measure")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="fwd and/or fwd_bwd")
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="torch threads (1 is steadier on a busy machine)"
    )
    parser.add_argument(
        "--check", action="store_true", help="only check that the MoE layers agree; no timing"
    )
    parser.add_argument("--_memory", nargs=3, metavar=("LAYER", "TOKENS", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--_time", nargs="+", metavar="TOKENS MODE LAYER", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory:
        layer, tokens, mode = args._memory
        print(json.dumps(measure_memory(layer, int(tokens), mode)), flush=True)
        return
    if args._time:
        tokens, mode, *layers = args._time
        for record in time_layers(layers, int(tokens), mode, args.repeats, args.warmup):
            print(json.dumps(record), flush=True)
        return
    if args.check:
        parity_check()
        return
    layers = []
    for layer in args.layers:
        reason = skip_reason(layer)
        if reason:
            print(json.dumps({"layer": layer, "skipped": reason}), flush=True)
        else:
            layers.append(layer)
    records = []
    for tokens in args.tokens:
        for mode in args.modes:
            for record in measure(layers, tokens, mode, args.repeats, args.warmup):
                print(json.dumps(record), flush=True)
                records.append(record)
    print(json.dumps({"ratios": ratios(records)}), flush=True)


if __name__ == "__main__":
    main()
