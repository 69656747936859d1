"""Evaluation report: one Markdown file with comparison tables and plots, and one stable `metrics.json`.

`write_report` takes the metrics of one model (`{"vqa": ..., "language": ..., "routing": ...}`, each from
`evaluate_vqa`, `evaluate_language`, `evaluate_routing`, any of them missing) or of several named models
(`{"base": {...}, "stage1": {...}, ...}`) and renders one row per model in each table, so runs of the
quickstart stages and baselines compare side by side. `metrics.json` has the fixed layout
`{"schema": SCHEMA, "models": {name: {"vqa", "language", "routing"}}}` (per-question predictions left out);
`eve quickstart` adds `comparisons` (paired VQA differences) and, with `--ablation`, `ablation` (one row per
trained allocation policy) beside them.
"""

from __future__ import annotations

import json
import os

__all__ = ["SCHEMA", "normalize_metrics", "render_report", "write_report"]

SCHEMA = "eve-vlm/eval/v1"
SECTIONS = ("vqa", "language", "routing")


def normalize_metrics(metrics: dict) -> dict[str, dict]:
    """`{name: {"vqa", "language", "routing"}}` from one model's or several models' metrics, without
    `predictions` (one model's metrics are named `model`)."""
    if metrics and set(metrics) <= set(SECTIONS):
        metrics = {"model": metrics}
    out = {}
    for name, sections in metrics.items():
        out[name] = {}
        for section in SECTIONS:
            value = sections.get(section)
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "predictions"}
            out[name][section] = value
    return out


def _fmt(value, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _vqa_section(models: dict) -> list[str]:
    have = {n: m["vqa"] for n, m in models.items() if m.get("vqa")}
    if not have:
        return []
    types = sorted({t for v in have.values() for t in v.get("by_type", {})})
    header = ["model", "questions", "accuracy", "± SE", "exact match", *types]
    rows = [
        [
            name,
            _fmt(v["questions"]),
            _fmt(v["accuracy"]),
            _fmt(v.get("accuracy_stderr")),
            _fmt(v["exact_match"]),
            *[_fmt(v.get("by_type", {}).get(t, {}).get("accuracy")) for t in types],
        ]
        for name, v in have.items()
    ]
    note = (
        "Accuracy in % (VQAv2 normalisation; soft accuracy where a question has several references; "
        "per question type in the last columns), with its standard error over questions (± SE)."
    )
    described = sorted({v["describe_first"] for v in have.values() if v.get("describe_first")})
    for prompt in described:
        names = ", ".join(f"`{n}`" for n, v in have.items() if v.get("describe_first") == prompt)
        note += (
            f" Describe first ({names}): each question is asked after the model's own reply to "
            f'"{prompt}" about its image, as the second turn of that conversation.'
        )
    return ["## VQA", "", note, "", *_table(header, rows), ""]


def _language_section(models: dict) -> list[str]:
    have = {n: m["language"] for n, m in models.items() if m.get("language")}
    if not have:
        return []
    out = ["## Language ability vs the base LLM", ""]
    bases = {name: v["base"] for name, v in have.items()}
    out += [f"Base of `{name}`: {base}." for name, base in bases.items()] + [""]
    header = ["model", "set", "metric", "model", "base", "delta"]
    rows = []
    for name, v in have.items():
        if v.get("text"):
            t = v["text"]
            rows.append(
                [
                    name,
                    f"text ({t['tokens']} tokens)",
                    "perplexity",
                    _fmt(t["model_perplexity"], 3),
                    _fmt(t["base_perplexity"], 3),
                    _fmt(t["delta_perplexity"], 3, signed=True),
                ]
            )
        for set_name, mc in (v.get("mc") or {}).items():
            for metric in ("acc", "acc_norm"):
                rows.append(
                    [
                        name,
                        f"{set_name} ({mc['items']} items)",
                        metric,
                        _fmt(mc[f"model_{metric}"]),
                        _fmt(mc[f"base_{metric}"]),
                        _fmt(mc[f"delta_{metric}"], signed=True),
                    ]
                )
    return [*out, *_table(header, rows), ""]


def _routing_section(models: dict, plots: dict[str, list[str]], out_dir: str) -> list[str]:
    have = {n: m["routing"] for n, m in models.items() if m.get("routing")}
    if not have:
        return []
    out = ["## Routing", ""]
    out += [
        "Mean over EVF layers. *success* = share of tokens processed by the expert they chose (the paper's "
        "Fig. 3); *to vision* = share routed to the vision experts; entropy in nats.",
        "",
    ]
    header = ["model", "policy", "capacity", "image success", "text success", "image to vision"]
    header += ["text to vision", "entropy"]
    rows = []
    for name, r in have.items():
        for policy, per_layer in r["policies"].items():
            layers = list(per_layer.values())

            def mean(key, layers=layers):
                return sum(x[key] for x in layers) / len(layers)

            own = " (own)" if policy == r["policy"] else ""
            rows.append(
                [
                    name,
                    policy + own,
                    f"{r['capacity']} ({r['capacity_factor']})",
                    _fmt(mean("success_image"), 3),
                    _fmt(mean("success_text"), 3),
                    _fmt(mean("vision_routed_image"), 3),
                    _fmt(mean("vision_routed_text"), 3),
                    _fmt(mean("entropy"), 3),
                ]
            )
    out += [*_table(header, rows), ""]
    for name, r in have.items():
        policy = r["policy"] if r["policy"] in r["policies"] else next(iter(r["policies"]))
        out += [f"### `{name}` per layer ({policy})", ""]
        header = [
            "layer",
            "image routed/expert",
            "image kept/expert",
            "text routed/expert",
            "text kept/expert",
        ]
        header += ["image drop", "text drop", "entropy"]
        rows = [
            [
                layer,
                str(x["routed_image"]),
                str(x["kept_image"]),
                str(x["routed_text"]),
                str(x["kept_text"]),
                _fmt(x["drop_rate_image"], 3),
                _fmt(x["drop_rate_text"], 3),
                _fmt(x["entropy"], 3),
            ]
            for layer, x in r["policies"][policy].items()
        ]
        out += [*_table(header, rows), ""]
        for path in plots.get(name, []):
            out += [_link(path, out_dir), ""]
    return out


def render_report(
    metrics: dict, plots: dict[str, list[str]] | list[str] | None = None, out_dir: str = "."
) -> str:
    """The Markdown report text (image links relative to `out_dir`)."""
    models = normalize_metrics(metrics)
    if isinstance(plots, list):
        plots = {next(iter(models)): plots} if models else {}
    plots = plots or {}
    lines = ["# Eve evaluation report", "", f"Models: {', '.join(f'`{n}`' for n in models)}.", ""]
    lines += _vqa_section(models) + _language_section(models) + _routing_section(models, plots, out_dir)
    text = "\n".join(lines)
    unlinked = [_link(p, out_dir) for paths in plots.values() for p in paths if _link(p, out_dir) not in text]
    if unlinked:
        text += "\n" + "\n\n".join(["## Plots", *unlinked]) + "\n"
    return text


def _link(path: str, out_dir: str) -> str:
    """A Markdown image link to `path`, relative to the report's folder."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir)).replace(os.sep, "/")
    return f"![{os.path.splitext(os.path.basename(path))[0]}]({rel})"


def write_report(
    metrics: dict, out_dir: str | os.PathLike, plots: dict[str, list[str]] | list[str] | None = None
) -> str:
    """Writes `report.md` and `metrics.json` into `out_dir`.

    Args:
        metrics: One model's `{"vqa", "language", "routing"}` metrics (any may be missing or None), or
            `{model name: such metrics}` for a comparison (one table row per model).
        out_dir: Output folder (created).
        plots: PNG paths to link, as a list (one model) or `{model name: [paths]}`.

    Returns:
        The path of `report.md`.
    """
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    models = normalize_metrics(metrics)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"schema": SCHEMA, "models": models}, f, indent=2, sort_keys=True)
        f.write("\n")
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_report(metrics, plots, out_dir))
    return path
