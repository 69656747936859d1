"""Routing eval: counts add up, equal the training-mode statistics, nothing dropped at eval capacity with E=2,
policies and capacity restored, plots written, CLI."""

import json

import pytest
import torch
from test_eval_vqa import model_and_processor, run_cli, write_eval_set

from eve_vlm.errors import ConfigError
from eve_vlm.eval import cli
from eve_vlm.eval.routing import POLICIES, evaluate_routing, plot_routing, routing_batches, routing_examples
from eve_vlm.eval.vqa import load_vqa_rows

DETERMINISTIC = ("position", "bpr", "gbpr", "img_gbpr", "modality")


def setup(tmp_path, **options):
    model, processor = model_and_processor(evf=True)
    if options:
        for evf in model.evf_layers.values():
            for key, value in options.items():
                setattr(evf, key, value)
    return model, processor, load_vqa_rows(write_eval_set(tmp_path))


def test_counts_add_up_and_match_training_mode_stats(tmp_path):
    model, processor, rows = setup(tmp_path)
    result = evaluate_routing(model, processor, rows, policies=POLICIES, batch_size=2, progress=False)
    assert result["rows"] == 4 and result["layers"] == [0, 2] and result["capacity"] == "train"
    image_tokens = 4 * model.config.num_image_tokens
    assert result["tokens"]["image"] == image_tokens
    for per_layer in result["policies"].values():
        for x in per_layer.values():
            for m in ("image", "text"):
                routed, kept, dropped = (torch.tensor(x[f"{k}_{m}"]) for k in ("routed", "kept", "dropped"))
                assert torch.equal(kept + dropped, routed) and bool((kept <= routed).all())
                assert x[f"success_{m}"] == pytest.approx(float(kept.sum() / routed.sum()))
                assert sum(x[f"share_routed_{m}"]) == pytest.approx(1.0)
            assert sum(x["routed_image"]) == image_tokens
    assert any(sum(x["dropped_text"]) for x in result["policies"]["img_gbpr"].values())  # capacity bites

    batches = list(routing_batches(processor, routing_examples(model, processor, rows), batch_size=2))
    assert result["tokens"]["padding"] == sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    model.train()
    try:
        for policy in DETERMINISTIC:
            for evf in model.evf_layers.values():
                evf.set_allocation(policy)
            totals = {}
            with torch.no_grad():
                for batch in batches:
                    for i, s in model(**batch).routing.items():
                        t = totals.setdefault(str(i), [torch.zeros_like(s.routed_image) for _ in range(4)])
                        for k, v in enumerate((s.routed_image, s.kept_image, s.routed_text, s.kept_text)):
                            t[k] += v
            for layer, (ri, ki, rt, kt) in totals.items():
                x = result["policies"][policy][layer]
                assert [x["routed_image"], x["kept_image"], x["routed_text"], x["kept_text"]] == [
                    ri.tolist(),
                    ki.tolist(),
                    rt.tolist(),
                    kt.tolist(),
                ], (policy, layer)
    finally:
        model.eval()


def test_nothing_dropped_at_eval_capacity_with_two_experts(tmp_path):
    model, processor, rows = setup(tmp_path)
    assert all(evf.num_experts == 2 for evf in model.evf_layers.values())
    result = evaluate_routing(model, processor, rows, capacity="eval", batch_size=4, progress=False)
    assert result["capacity_factor"] == 2.0
    for per_layer in result["policies"].values():
        for x in per_layer.values():
            assert sum(x["dropped_image"]) == 0 and sum(x["dropped_text"]) == 0
            assert x["success_image"] == 1.0 and x["success_text"] == 1.0


def test_policy_and_capacity_restored_and_rts_repeatable(tmp_path):
    model, processor, rows = setup(tmp_path)
    before = [(evf.allocation, evf.eval_capacity_factor, evf.training) for evf in model.evf_layers.values()]
    state = torch.random.get_rng_state()
    a = evaluate_routing(model, processor, rows, policies=["rts"], batch_size=4, seed=3, progress=False)
    b = evaluate_routing(model, processor, rows, policies=["rts"], batch_size=4, seed=3, progress=False)
    assert a == b
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [(e.allocation, e.eval_capacity_factor, e.training) for e in model.evf_layers.values()] == before
    with pytest.raises(ConfigError, match="Unknown allocation"):
        evaluate_routing(model, processor, rows, policies=["nope"], progress=False)
    plain, plain_processor = model_and_processor(evf=False)
    with pytest.raises(ConfigError, match="no Elastic Vision FFN"):
        evaluate_routing(plain, plain_processor, rows, progress=False)


def test_plots_are_written(tmp_path):
    model, processor, rows = setup(tmp_path)
    result = evaluate_routing(model, processor, rows, batch_size=2, progress=False)
    paths = plot_routing(result, tmp_path / "plots")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["routing_layers.png", "routing_policies.png"]
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024


def test_eve_eval_routing_cli(tmp_path):
    model, processor, _ = setup(tmp_path)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    run_cli(
        ["eval", "routing", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "eval.jsonl")]
        + ["--images", str(tmp_path), "--out", str(out), "--policies", "gbpr", "img_gbpr", "--quiet"]
    )
    result = json.loads((out / "routing_metrics.json").read_text())
    assert list(result["policies"]) == ["gbpr", "img_gbpr"] and result["policy"] == "img_gbpr"
    assert cli.POLICIES == POLICIES  # the CLI's choices are the model's policies
    assert (out / "routing_layers.png").stat().st_size > 1024
    assert (out / "routing_policies.png").stat().st_size > 1024
