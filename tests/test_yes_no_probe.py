"""`benchmarks/yes_no_probe.py` draws prompts whose question alone does not predict the answer."""

import random
from collections import Counter, defaultdict

from conftest import load_benchmark

from eve_vlm.data.builtin.easy_vqa import question_facts, yes_no_form

QUESTIONS = [
    "Is there a red shape? Answer with one word.",
    "Is there not a red shape? Answer with one word.",
    "Does the image contain a circle? Answer with one word.",
    "Does the image not contain a circle? Answer with one word.",
    "Is there a blue shape in the image? Answer with one word.",
    "Is no triangle present? Answer with one word.",
]


def test_every_question_and_form_is_answered_yes_half_of_the_time():
    probe = load_benchmark("yes_no_probe")
    rng = random.Random(0)
    drawn = [probe.sample(rng, QUESTIONS) for _ in range(6000)]
    by_question, by_form = defaultdict(Counter), defaultdict(Counter)
    for prompt, answer in drawn:
        caption, question = prompt.split("\n", 1)
        words = caption.rstrip(".").split()
        facts, ruled_out = question_facts(question.removesuffix(" Answer with one word."), answer)
        assert facts.get("color", words[-2]) == words[-2] and facts.get("shape", words[-1]) == words[-1]
        assert not ruled_out & {words[-2], words[-1]}
        by_question[question][answer] += 1
        by_form[yes_no_form(question)][answer] += 1
    assert set(by_question) == set(QUESTIONS) and len(by_form) == 4
    for counts in [*by_question.values(), *by_form.values()]:
        assert 0.44 < counts["yes"] / (counts["yes"] + counts["no"]) < 0.56, counts


def test_the_question_only_baseline_is_near_chance_and_catches_a_biased_draw():
    probe = load_benchmark("yes_no_probe")
    rng = random.Random(1)
    train = [probe.sample(rng, QUESTIONS) for _ in range(3000)]
    held_out = [probe.sample(rng, QUESTIONS) for _ in range(1000)]
    assert 44.0 < probe.question_only_accuracy(train, held_out) < 56.0

    # A draw that picks the question after the answer (negated questions then mostly "yes") is caught.
    def answer_first(rng):
        wanted = rng.choice(["yes", "no"])
        while True:
            question, colour, shape = (
                rng.choice(QUESTIONS),
                rng.choice(probe.COLORS),
                rng.choice(probe.SHAPES),
            )
            if probe.answer(question, colour, shape) == wanted:
                return f"The image shows a {colour} {shape}.\n{question}", wanted

    biased_train = [answer_first(rng) for _ in range(3000)]
    biased_held_out = [answer_first(rng) for _ in range(1000)]
    assert probe.question_only_accuracy(biased_train, biased_held_out) > 70.0
