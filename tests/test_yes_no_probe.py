"""`benchmarks/yes_no_probe.py` draws prompts whose question alone does not predict the answer."""

import importlib.util
import random
from collections import Counter, defaultdict
from pathlib import Path

from eve_vlm.data.builtin.easy_vqa import yes_no_form

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "yes_no_probe.py"

QUESTIONS = [
    "Is there a red shape? Answer with one word.",
    "Is there not a red shape? Answer with one word.",
    "Does the image contain a circle? Answer with one word.",
    "Does the image not contain a circle? Answer with one word.",
    "Is there a blue shape in the image? Answer with one word.",
    "Is no triangle present? Answer with one word.",
]


def load_probe():
    spec = importlib.util.spec_from_file_location("yes_no_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_question_and_form_is_answered_yes_half_of_the_time():
    probe = load_probe()
    rng = random.Random(0)
    drawn = [probe.sample(rng, QUESTIONS) for _ in range(6000)]
    by_question, by_form = defaultdict(Counter), defaultdict(Counter)
    for prompt, answer in drawn:
        caption, question = prompt.split("\n", 1)
        words = caption.rstrip(".").split()
        assert probe.answer(question, words[-2], words[-1]) == answer
        by_question[question][answer] += 1
        by_form[yes_no_form(question)][answer] += 1
    assert set(by_question) == set(QUESTIONS) and len(by_form) == 4
    for counts in [*by_question.values(), *by_form.values()]:
        assert 0.44 < counts["yes"] / (counts["yes"] + counts["no"]) < 0.56, counts


def test_the_question_only_baseline_is_near_chance_and_catches_a_biased_draw():
    probe = load_probe()
    rng = random.Random(1)
    train = [probe.sample(rng, QUESTIONS) for _ in range(3000)]
    held_out = [probe.sample(rng, QUESTIONS) for _ in range(1000)]
    assert 44.0 < probe.question_only_accuracy(train, held_out) < 56.0
    # Held-out prompts whose answer follows the question's form ("no" unless negated) are caught.
    biased = [(p, "yes" if yes_no_form(p.split("\n", 1)[1])[0] else "no") for p, _ in held_out]
    assert probe.question_only_accuracy(biased, biased) == 100.0
