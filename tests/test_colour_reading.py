"""`benchmarks/colour_reading.py`: its linear probe and its refusal of a missing model folder."""

import torch
from conftest import load_benchmark, run_benchmark


def test_the_probe_reads_a_linearly_coded_class_and_not_noise():
    probe = load_benchmark("colour_reading").probe
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    x = torch.randn(400, 16, generator=g)
    coded = x.clone()
    coded[:, :4] += 4.0 * torch.nn.functional.one_hot(y, 4)  # the class is a direction in feature space
    fit, held_out = probe(coded[:300], y[:300], coded[300:], y[300:], 4)
    assert fit > 95 and held_out > 95
    _, chance = probe(x[:300], y[:300], x[300:], y[300:], 4)  # noise: no better than chance far off
    assert chance < 45


def test_a_missing_model_folder_is_named_with_exit_2(tmp_path):
    proc = run_benchmark("colour_reading", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nowhere") in proc.stderr and "eve quickstart" in proc.stderr
