"""`eve eval bench` and `eve eval score`: generation of every benchmark's answers file, then model-free
scoring into the paper's table."""

from __future__ import annotations

import json
import os

from eve_vlm.errors import ConfigError
from eve_vlm.eval.bench.answers import read_answers
from eve_vlm.eval.bench.base import BenchmarkRegistry
from eve_vlm.eval.bench.generate import generate_benchmark_answers
from eve_vlm.eval.bench.language_sets import LANGUAGE_SETS, score_language_set
from eve_vlm.eval.bench.table import write_paper_table

__all__ = ["run_bench", "score_bench"]


def score_bench(registry: BenchmarkRegistry, name: str, predictions: str, data_root: str) -> dict:
    """Scores an answers file of benchmark `name` (no model needed)."""
    return registry.get(name).score(data_root, read_answers(predictions))


def _select(registry: BenchmarkRegistry, benches: list[str] | None) -> tuple[list, list]:
    language = {s.name: s for s in LANGUAGE_SETS}
    names = benches or [*registry.names(), *language]
    unknown = [n for n in names if n not in language and n not in registry.names()]
    if unknown:
        known = ", ".join([*registry.names(), *language])
        raise ConfigError(f"Unknown benchmark {unknown[0]!r}; choose from: {known}.")
    return [registry.get(n) for n in names if n not in language], [
        language[n] for n in names if n in language
    ]


def run_bench(
    registry: BenchmarkRegistry,
    model,
    processor,
    *,
    data_root: str,
    out: str,
    name: str,
    benches: list[str] | None = None,
    base=None,
    base_name: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> str:
    """Generates the answers of the selected benchmarks (resuming `out/answers/<bench>.jsonl`), scores them and
    the language sets (model and base LLM), and writes the table.

    Args:
        registry: The benchmarks (`paper_suite()`).
        model: An `EveForConditionalGeneration` in eval mode.
        processor: Its `EveProcessor`.
        data_root: LLaVA's `playground/data/eval` layout plus `mmlu/`, `ceval/`, `piqa/`.
        out: Output folder.
        name: The model's row name.
        benches: Benchmark names (default: all nine).
        base: The base LLM for the language columns (default: the one recorded at stage 1).
        base_name: Its description.
        batch_size: Questions per generate call / sequences per forward.
        max_new_tokens: Cap on every benchmark's answer length (default: LLaVA's, 128 or 1024).
        limit: Only the first N questions (items) of each benchmark, for a quick check.
        progress: Progress bars.

    Returns:
        The path of `report.md`.
    """
    from eve_vlm.eval.language import load_recorded_base

    vlm_benches, language_sets = _select(registry, benches)
    loaded = {b.name: b.load(data_root) for b in vlm_benches}  # every file checked before generating
    subjects = {s.name: s.load(data_root, 5) for s in language_sets}
    if language_sets and base is None:
        base, base_name = load_recorded_base(model)
    vlm = {}
    for bench in vlm_benches:
        questions = loaded[bench.name][:limit]
        if max_new_tokens is not None:
            questions = [q.capped(max_new_tokens) for q in questions]
        path = os.path.join(out, "answers", f"{bench.name}.jsonl")
        generate_benchmark_answers(
            model, processor, questions, path, model_id=name, batch_size=batch_size, desc=bench.name,
            progress=progress,
        )  # fmt: skip
        vlm[bench.name] = bench.score(data_root, read_answers(path))
    language = {}
    for lang in language_sets:
        items = _limit_items(subjects[lang.name], limit)
        language[lang.name] = {
            "model": score_language_set(lang, model, processor.text_tokenizer, items, batch_size),
            "base": score_language_set(lang, base, processor.text_tokenizer, items, batch_size),
        }
    with open(os.path.join(out, "bench_metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"vlm": vlm, "language": language}, f, indent=2, ensure_ascii=False)
    return write_paper_table(out, name, vlm, language, base_name)


def _limit_items(subjects: dict[str, list[dict]], limit: int | None) -> dict[str, list[dict]]:
    """The first `limit` items over the subjects in order (subjects left empty are dropped)."""
    if limit is None:
        return subjects
    out, left = {}, limit
    for subject, items in subjects.items():
        if left <= 0:
            break
        out[subject], left = items[:left], left - len(items[:left])
    return out
