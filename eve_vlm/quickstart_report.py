"""The sections `eve quickstart` appends to the evaluation report: what each model trains, paired differences
between models, the trained allocation-policy ablation (table and plot) and the wall time."""

from __future__ import annotations

import os
from pathlib import Path

ABLATION_POLICIES = ("rts", "bpr", "gbpr", "img_gbpr", "modality")
COMPARISONS = (  # (model, against): paired differences on the same questions, when both were evaluated
    ("stage3", "stage2"),
    ("stage3", "control"),
    ("control", "stage2"),
    ("baseline", "stage2"),
)


def comparisons(metrics: dict[str, dict]) -> list[dict]:
    """Paired accuracy differences (same questions) between the models named in `COMPARISONS`, and between
    each ablation run and the `img_gbpr` one."""
    from eve_vlm.eval.vqa import paired_difference

    pairs = list(COMPARISONS) + [
        (name, "ablation-img_gbpr")
        for name in metrics
        if name.startswith("ablation-") and name != "ablation-img_gbpr"
    ]
    out = []
    for a, b in pairs:
        pa = (metrics.get(a) or {}).get("vqa", {}) or {}
        pb = (metrics.get(b) or {}).get("vqa", {}) or {}
        if "predictions" in pa and "predictions" in pb:
            out.append({"model": a, "against": b, **paired_difference(pa["predictions"], pb["predictions"])})
    return out


def comparison_section(pairs: list[dict]) -> str:
    """Paired differences in VQA accuracy, with their standard errors."""
    if not pairs:
        return ""
    lines = [
        "",
        "## Paired differences in VQA accuracy",
        "",
        "Accuracy of *model* minus *against* on the same questions, in points, with the standard error of the "
        "mean per-question difference; |difference| > 2 SE is marked as outside the noise of sampling "
        "questions (each model is one training run, so the noise between training seeds is not in it). "
        "`control` is stage 2 continued from its result on stage 3's data, steps, batch, seed and learning-rate "
        "schedule (stage 2's peak learning rate; its projector and LoRA train instead of the vision FFNs). "
        "Each ablation run is compared with the `img_gbpr` one (same data, capacity and steps).",
        "",
        "| model | against | questions | difference | SE | outside 2 SE |",
        "|---|---|---:|---:|---:|---|",
    ]
    for p in pairs:
        outside = "yes" if abs(p["difference"]) > 2 * p["stderr"] else "no"
        lines.append(
            f"| {p['model']} | {p['against']} | {p['questions']} | {p['difference']:+.2f} | "
            f"{p['stderr']:.2f} | {outside} |"
        )
    return "\n".join(lines) + "\n"


def ablation_rows(metrics: dict[str, dict], timings: dict[str, float]) -> list[dict]:
    """One row per trained allocation policy: VQA with its SE, the routing under its own policy (training
    capacity; mean over EVF layers) and the training time."""
    rows = []
    for name in [n for n in metrics if n.startswith("ablation-")]:
        m = metrics.get(name) or {}
        routing, vqa = m.get("routing"), m.get("vqa")
        if not routing or not vqa:
            continue
        policy = routing["policy"]
        layers = list(routing["policies"][policy].values())

        def mean(key, layers=layers):
            return sum(x[key] for x in layers) / len(layers)

        rows.append(
            {
                "model": name,
                "policy": policy,
                "accuracy": vqa["accuracy"],
                "accuracy_stderr": vqa.get("accuracy_stderr", 0.0),
                "questions": vqa["questions"],
                "entropy": mean("entropy"),
                "image_to_vision": mean("vision_routed_image"),
                "text_to_vision": mean("vision_routed_text"),
                "image_drop": mean("drop_rate_image"),
                "text_drop": mean("drop_rate_text"),
                "train_seconds": timings.get(f"{name} train", 0.0),
            }
        )
    order = {p: i for i, p in enumerate(ABLATION_POLICIES)}
    return sorted(rows, key=lambda r: order.get(r["policy"], len(order)))


def ablation_section(
    metrics: dict[str, dict], timings: dict[str, float], out_dir: Path, capacity: float, step_fraction: float
) -> str:
    """The trained allocation-policy ablation (at capacity factor `capacity`, for `step_fraction` of stage
    3's steps): a table and a plot."""
    rows = ablation_rows(metrics, timings)
    if not rows:
        return ""
    lines = [
        "",
        "## Allocation policies, each trained",
        "",
        f"Stage 3 trained once per token-allocation policy from the same stage 2, at capacity factor "
        f"{capacity} for {step_fraction:.0%} of stage 3's steps, on stage 2's conversations and batch (where the "
        "language FFN is asked for more tokens than its capacity, so the policies differ in what they drop), "
        "with stage 3's recipe otherwise. "
        "VQA on the same questions (± standard error); routing on training conversations (batches of 8) "
        "under the model's own policy at the training capacity, mean over EVF layers (entropy in nats; *drop* = share of tokens not processed by "
        "the expert they chose).",
        "",
        "| policy | easy-VQA | ± SE | entropy | image to vision | text to vision | image drop | text drop | "
        "train min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['accuracy']:.2f} | {r['accuracy_stderr']:.2f} | {r['entropy']:.3f} | "
            f"{r['image_to_vision']:.3f} | {r['text_to_vision']:.3f} | {r['image_drop']:.3f} | "
            f"{r['text_drop']:.3f} | {r['train_seconds'] / 60:.1f} |"
        )
    wall = sum(timings.get(f"{r['model']} {part}", 0.0) for r in rows for part in ("train", "eval"))
    lines += ["", f"Wall time of the {len(rows)} trainings and evaluations: {wall / 60:.1f} minutes.", ""]
    plot = plot_ablation(rows, out_dir / "ablation.png")
    lines += [f"![ablation]({plot.name})", ""]
    return "\n".join(lines)


def plot_ablation(rows: list[dict], path: Path) -> Path:
    """VQA accuracy (± SE) and the share of image and text tokens routed to the vision FFN, per policy."""
    from eve_vlm.eval.routing import _pyplot

    plt = _pyplot()
    names = [r["policy"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(names, [r["accuracy"] for r in rows], yerr=[r["accuracy_stderr"] for r in rows], capsize=4)
    low = min(r["accuracy"] - 3 * r["accuracy_stderr"] for r in rows)
    left.set_ylim(max(0.0, low - 2), 100)
    left.set_ylabel("easy-VQA accuracy (%)")
    width = 0.38
    xs = range(len(rows))
    right.bar([x - width / 2 for x in xs], [r["image_to_vision"] for r in rows], width, label="image")
    right.bar([x + width / 2 for x in xs], [r["text_to_vision"] for r in rows], width, label="text")
    right.set_xticks(list(xs), names)
    right.set_ylim(0, 1.05)
    right.set_ylabel("share routed to the vision FFN")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle("Stage 3 trained per allocation policy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parameters(count: int) -> str:
    """A parameter count in millions (two decimals)."""
    return f"{count / 1e6:.2f}M"


def training_section(trained: dict[str, dict]) -> str:
    """What each model trains, from its training summary (`eve_training.json`: its recipe and the parameters
    each `trainable` rule matched): the model it starts from, data, steps x batch, learning rate, seed and the
    trained parameters per rule, so the report shows each comparison's budget."""
    lines = [
        "",
        "## What each model trains",
        "",
        "Trained parameters per `trainable` rule (millions; frozen ones not counted).",
        "",
        "| model | from | data | steps x batch | learning rate | seed | trained parameters |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for name, summary in trained.items():
        recipe = summary["recipe"]
        t = recipe["training"]
        parent = Path(recipe["model"]["init_from"]).name if recipe["model"].get("init_from") else "-"
        data = ", ".join(Path(source["path"]).name for source in recipe["data"]["sources"])
        rules = summary["trainable"]  # {pattern: [tensors, parameters]}
        total = sum(count for _, count in rules.values())
        cells = {
            pattern.replace("|", "\\|"): count for pattern, (_, count) in rules.items()
        }  # a pipe ends a cell
        each = " + ".join(f"`{pattern}` {parameters(count)}" for pattern, count in cells.items())
        batch = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]
        lines.append(
            f"| {name} | {parent} | {data} | {t['max_steps']} x {batch} | {t['learning_rate']:g} | {t['seed']} | "
            f"{each}{f' = {parameters(total)}' if len(rules) > 1 else ''} |"
        )
    return "\n".join(lines) + "\n"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """The CPU's model name and feature flags from `cpuinfo`, first processor (empty where there is none)."""
    try:
        first = cpuinfo.read_text().split("\n\n")[0]
    except OSError:
        return "", set()
    fields = {
        key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())
    }
    return fields.get("model name", ""), set(fields.get("flags", "").split())


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    import platform

    return cpu_flags(cpuinfo)[0] or platform.processor() or "CPU model unknown"


def bf16_units(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's bf16 matrix units, which bf16 autocast's kernels use when present: training and greedy
    answers in bf16 round differently with and without them, so runs on other CPUs give other models."""
    units = [name for name in ("avx512_bf16", "amx_bf16") if name in cpu_flags(cpuinfo)[1]]
    return f" ({', '.join(units)})" if units else " (no bf16 units)"


def timing_section(timings: dict[str, float], smoke: bool, reused: list[str] | None = None) -> str:
    """The wall-time table appended to the report (`total` is the sum of the steps before it except the
    ablation's, which `ablation (not in total)` sums)."""
    import platform

    import torch
    import transformers

    lines = [
        "",
        "## Wall time",
        "",
        f"Machine: {platform.machine()}, {cpu_name()}, {os.cpu_count()} CPU cores, "
        f"{torch.backends.cpu.get_cpu_capability()} kernels{bf16_units()}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}"
        + (" (smoke run: a few steps per stage)." if smoke else "."),
        "",
    ]
    if reused:
        lines += [
            f"Reused from an earlier run in this folder, with the times measured then: {', '.join(reused)}.",
            "",
        ]
    lines += [
        "| step | seconds | minutes |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v:.0f} | {v / 60:.1f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
