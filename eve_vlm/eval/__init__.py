"""Evaluation: VQA accuracy (`vqa`), language ability next to the base LLM (`language`, `lm_eval_adapter`),
EVF routing per layer and allocation policy (`routing`), and the Markdown/JSON report (`report`)."""

from eve_vlm.eval.language import evaluate_language, load_mc_items, load_texts
from eve_vlm.eval.report import write_report
from eve_vlm.eval.routing import evaluate_routing, plot_routing
from eve_vlm.eval.vqa import evaluate_vqa, load_vqa_rows, normalize_answer, score_predictions

__all__ = [
    "evaluate_language",
    "evaluate_routing",
    "evaluate_vqa",
    "load_mc_items",
    "load_texts",
    "load_vqa_rows",
    "normalize_answer",
    "plot_routing",
    "score_predictions",
    "write_report",
]
