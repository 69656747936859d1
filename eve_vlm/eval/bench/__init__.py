"""The paper's benchmark suite: one adapter per benchmark (files under `--data-root`, prompt, parser, official
metric, headline number), resumable batched generation into LLaVA answers files, model-free scoring, and the
paper's table. `paper_suite()` is the registry the `eve eval bench` / `eve eval score` commands use."""

from eve_vlm.eval.bench.base import BenchmarkRegistry, Question, VLMBenchmark
from eve_vlm.eval.bench.gqa import GQA
from eve_vlm.eval.bench.language_sets import LANGUAGE_SETS, LanguageSet
from eve_vlm.eval.bench.mmbench import MMBENCH
from eve_vlm.eval.bench.mme import MME
from eve_vlm.eval.bench.pope import POPE
from eve_vlm.eval.bench.scienceqa import SQA_IMG
from eve_vlm.eval.bench.textvqa import TEXTVQA

__all__ = ["LANGUAGE_SETS", "BenchmarkRegistry", "LanguageSet", "Question", "VLMBenchmark", "paper_suite"]


def paper_suite() -> BenchmarkRegistry:
    """The six VLM benchmarks of the paper's table, in its column order."""
    return BenchmarkRegistry(vlm=(GQA, SQA_IMG, TEXTVQA, POPE, MME, MMBENCH))
