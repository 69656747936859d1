"""`benchmarks/yes_no_word_slots.py`: the image slots get the colour and shape words' embeddings, alternating;
rows of images whose colour or shape is unknown are dropped; a missing stage 2 is named with exit 2."""

import torch
from conftest import load_benchmark, run_benchmark


def test_the_slots_alternate_the_colour_and_shape_words_of_each_image():
    script = load_benchmark("yes_no_word_slots")
    embeddings = torch.arange(12.0).reshape(6, 2)
    ids = {"red": 1, "blue": 2, "circle": 4, "triangle": 5}
    facts = [{"color": "red", "shape": "triangle"}, {"color": "blue", "shape": "circle"}]
    slots = script.word_slots(embeddings, ids, facts, 4)
    assert slots.shape == (2, 4, 2)
    assert torch.equal(slots[0], embeddings[[1, 5, 1, 5]]) and torch.equal(slots[1], embeddings[[2, 4, 2, 4]])


def test_only_rows_whose_colour_and_shape_are_known_are_kept():
    script = load_benchmark("yes_no_word_slots")
    rows = [{"image": "a.png"}, {"image": "b.png"}, {"image": "c.png"}]
    facts = {"a.png": {"color": "red", "shape": "circle"}, "b.png": {"color": "red"}, "c.png": {}}
    assert script.known(rows, facts) == [{"image": "a.png"}]


def test_a_missing_stage_2_is_named_with_exit_2(tmp_path):
    proc = run_benchmark("yes_no_word_slots", "--stage2", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nothing") in proc.stderr and "eve quickstart" in proc.stderr
