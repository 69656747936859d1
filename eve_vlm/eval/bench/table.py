"""The paper's table (Eve, Fig. 1): six VLM columns and three language columns, one row per model, the base
LLM's language row beside it with the delta, and the paper's Eve-1.8B row for reference.

`write_paper_table` writes `report.md` and `metrics.json` (`{"schema", "columns", "models": {name: {column
key: headline}}, "base": {...}, "delta": {...}, "paper": {...}, "details": {name: {bench: all metrics}}}`).
"""

from __future__ import annotations

import json
import os

__all__ = ["PAPER_EVE_1_8B", "TABLE_SCHEMA", "write_paper_table"]

TABLE_SCHEMA = "eve-vlm/eval/paper-table/v1"
VLM_COLUMNS = (("gqa", "GQA"), ("sqa_img", "SQA-IMG"), ("textvqa", "TextVQA"), ("pope", "POPE"))
VLM_COLUMNS += (("mme", "MME"), ("mmbench", "MMBench"))
LANGUAGE_COLUMNS = (("mmlu", "MMLU"), ("ceval", "C-Eval"), ("piqa", "PIQA"))
PAPER_EVE_1_8B = {
    "gqa": 60.45, "sqa_img": 70.99, "textvqa": 60.26, "pope": 84.92, "mme": 1466.0, "mmbench": 62.8,
    "mmlu": 50.15, "ceval": 53.69, "piqa": 74.48,
}  # fmt: skip
NOTES = (
    "GQA: testdev-balanced accuracy (exact match after `rstrip('.').lower()`). SQA-IMG: accuracy on the test "
    "problems with an image (LLaVA's letter parser; unparseable = wrong). TextVQA: val with OCR tokens, VQA soft "
    "accuracy over the 10 leave-one-out annotator subsets. POPE: F1 averaged over adversarial, popular and random. "
    "MME: perception score (sum of 10 subtasks, max 2000). MMBench: dev, circular accuracy, letter/option-text "
    "matching without a GPT judge. MMLU and C-Eval: 5-shot, unweighted mean of subject accuracies; PIQA: 0-shot, "
    "OpenCompass PPL template. Language scores are the text path's; the base row is the base LLM on the same items."
)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def _signed(value) -> str:
    return "-" if value is None else f"{value:+.2f}"


def write_paper_table(
    out_dir: str, name: str, vlm: dict[str, dict], language: dict[str, dict], base_name: str | None
) -> str:
    """Writes `report.md` and `metrics.json` into `out_dir`.

    Args:
        out_dir: Output folder (created).
        name: The model's row name.
        vlm: `{bench: metrics}` of the VLM benchmarks run (each with `headline`).
        language: `{set: {"model": metrics, "base": metrics}}` of the language sets run.
        base_name: How the base LLM is described.

    Returns:
        The path of `report.md`.
    """
    os.makedirs(out_dir, exist_ok=True)
    row = {k: vlm[k]["headline"] for k, _ in VLM_COLUMNS if k in vlm}
    row.update({k: language[k]["model"]["headline"] for k, _ in LANGUAGE_COLUMNS if k in language})
    base = {k: language[k]["base"]["headline"] for k, _ in LANGUAGE_COLUMNS if k in language}
    delta = {k: row[k] - base[k] for k in base}
    columns = [*VLM_COLUMNS, *LANGUAGE_COLUMNS]
    metrics = {
        "schema": TABLE_SCHEMA,
        "columns": {k: title for k, title in columns},
        "models": {name: row},
        "base": {"name": base_name, "scores": base},
        "delta": {name: delta},
        "paper": {"Eve-1.8B": PAPER_EVE_1_8B},
        "details": {name: {**vlm, **language}},
    }
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    header = "| model | " + " | ".join(title for _, title in columns) + " |"
    lines = ["# The paper's benchmarks", "", header, "|" + "---|" * (len(columns) + 1)]
    lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |")
    if base:
        lines.append("| base LLM | " + " | ".join(_fmt(base.get(k)) for k, _ in columns) + " |")
        lines.append(
            "| delta (model - base) | " + " | ".join(_signed(delta.get(k)) for k, _ in columns) + " |"
        )
    lines.append(
        "| Eve-1.8B (paper, Fig. 1) | " + " | ".join(_fmt(PAPER_EVE_1_8B[k]) for k, _ in columns) + " |"
    )
    lines += ["", f"Base LLM: {base_name or '-'}.", "", NOTES, ""]
    partial = {k: v["missing"] for k, v in vlm.items() if v.get("missing")}
    if partial:
        lines += ["Unanswered questions (the score covers the answered ones): "
                  + ", ".join(f"{k} {n}" for k, n in partial.items()) + ".", ""]  # fmt: skip
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
