"""Language eval: perplexity and MC scoring against direct computations, the exact-zero delta of an Eve model
against its own base LLM saved and reloaded, lm-eval parity, file checks and the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_eval_vqa import model_and_processor, run_cli
from transformers import AutoModelForCausalLM

from eve_vlm.assets import weights_sha256
from eve_vlm.cli import main
from eve_vlm.errors import ConfigError, DataError
from eve_vlm.eval.language import (
    MC_PROMPT,
    encode_choice,
    evaluate_language,
    load_mc_items,
    mc_accuracy,
    mc_loglikelihoods,
    perplexity,
    score_language,
)

TEXTS = [
    "what is the colour of the shape in this image a red circle and a blue square " * 3,
    "there is one green triangle in the picture",
    "yes no",
]
MC_ITEMS = [
    {"question": "what is the colour of the circle", "choices": ["red", "blue", "green yellow"], "label": 0},
    {"question": "does the picture contain a square", "choices": ["yes", "no"], "label": 1},
    {
        "question": "what shape is in this image",
        "choices": ["circle", "square", "triangle", "one"],
        "label": 2,
    },
    {"question": "describe it", "choices": ["a red circle", "two blue squares"], "label": 1},
]


def write_mc(path, items=MC_ITEMS):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


@torch.no_grad()
def direct_nll(model, ids: list[int]) -> tuple[float, int]:
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    return float(F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="sum")), len(ids) - 1


def test_perplexity_is_exp_of_mean_token_nll():
    model, processor = model_and_processor(evf=True, lora=True)
    tok = processor.tokenizer
    result = perplexity(model, tok, TEXTS, chunk_len=7, batch_size=3)
    total = count = 0
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for start in range(0, len(ids), 7):
            if len(ids[start : start + 7]) > 1:
                nll, n = direct_nll(model, ids[start : start + 7])
                total, count = total + nll, count + n
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


@torch.no_grad()
def test_mc_picks_the_choice_with_the_highest_summed_logprob():
    model, processor = model_and_processor(evf=True)
    tok = processor.tokenizer
    scores = mc_loglikelihoods(model, tok, MC_ITEMS, batch_size=3)
    for item, got in zip(MC_ITEMS, scores, strict=True):
        context = MC_PROMPT.format(question=item["question"])
        direct = []
        for choice in item["choices"]:
            ctx, cont = encode_choice(tok, context, " " + choice)
            assert ctx + cont == tok.encode(context + " " + choice) and len(cont) == len(choice.split())
            logprobs = model(input_ids=torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
            direct.append(sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        assert got == pytest.approx(direct, abs=1e-4)
    picks = [max(range(len(s)), key=s.__getitem__) for s in scores]
    expected = 100 * sum(p == item["label"] for p, item in zip(picks, MC_ITEMS, strict=True)) / len(MC_ITEMS)
    assert mc_accuracy(MC_ITEMS, scores)["acc"] == expected


class MergingTokenizer:
    """Greedy longest-match over single characters and "ab"; trailing spaces are dropped (so a lone space
    encodes to nothing)."""

    def encode(self, text, add_special_tokens=True):
        text, ids, i = text.rstrip(), [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def test_encode_choice_never_scores_context_tokens_and_refuses_empty_continuations():
    tok = MergingTokenizer()
    context, continuation = encode_choice(tok, "xa", "bc")  # "xa" + "bc" merges "a" + "b" into "ab"
    assert context == [ord("x"), ord("a")] and continuation == [ord("b"), ord("c")]
    assert encode_choice(tok, "xy", "za") == ([ord("x"), ord("y")], [ord("z"), ord("a")])
    with pytest.raises(ValueError, match="encodes to no token"):
        encode_choice(tok, "Answer:", " ")
    items = [{"question": "pick one", "choices": ["red", ""], "label": 0}]
    with pytest.raises(ValueError, match=r"item 0 \('pick one'\)"):
        mc_loglikelihoods(torch.nn.Identity(), tok, items)


def test_acc_norm_divides_by_the_choice_length_in_characters_as_lm_eval():
    items = [{"question": "q", "choices": ["ab", "\u00fc"], "label": 0}]
    # per character: -2/2 = -1.0 beats -1.5/1; per byte of " " + choice it would be -2/3 against -1.5/3.
    assert mc_accuracy(items, [[-2.0, -1.5]]) == {"acc": 0.0, "acc_norm": 100.0, "items": 1}


def test_eve_model_delta_is_exactly_zero_against_its_reloaded_base(tmp_path):
    model, processor = model_and_processor(evf=False)
    model.language_model.save_pretrained(tmp_path / "base")  # the pristine base LLM
    model.add_lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.add_elastic_vision_ffns("alternate")
    for evf in model.evf_layers.values():
        torch.nn.init.normal_(evf.vision_ffns[0].down_proj.weight, std=0.5)
    model.eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids = processor.tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the adapters are live: the LM with LoRA on computes something else
        assert not torch.equal(model.language_model(input_ids=ids).logits, base(input_ids=ids).logits)

    with pytest.raises(ConfigError, match="records no base LLM.*--base"):  # never the model itself
        evaluate_language(model, processor.tokenizer, TEXTS, MC_ITEMS, chunk_len=9)
    model.config.base_language_model = {
        "path": str(tmp_path / "base"),
        "sha256": weights_sha256(tmp_path / "base"),
    }
    for reference in (base, None):  # the reloaded base, and the default (the base recorded in the config)
        result = evaluate_language(model, processor.tokenizer, TEXTS, MC_ITEMS, reference, chunk_len=9)
        text, mc = result["text"], result["mc"]["mc"]
        assert text["delta_perplexity"] == 0.0 and text["delta_nll"] == 0.0
        assert mc["delta_acc"] == 0.0 and mc["delta_acc_norm"] == 0.0
        assert text["model_perplexity"] > 1 and mc["items"] == len(MC_ITEMS)
    assert "recorded at stage 1" in result["base"]


def test_the_recorded_base_is_refused_when_its_weights_changed(tmp_path):
    model, processor = model_and_processor(evf=False)
    model.language_model.save_pretrained(tmp_path / "base")
    model.config.base_language_model = {
        "path": str(tmp_path / "base"),
        "sha256": weights_sha256(tmp_path / "base"),
    }
    changed = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        changed.get_output_embeddings().weight.mul_(1.5)
    changed.save_pretrained(tmp_path / "base")  # e.g. the folder was fine-tuned in place since stage 1
    with pytest.raises(ConfigError, match="changed since stage 1.*--base"):
        evaluate_language(model, processor.tokenizer, TEXTS, MC_ITEMS, chunk_len=9)
    model.config.base_language_model = {"path": str(tmp_path / "gone"), "sha256": "0"}
    with pytest.raises(ConfigError, match="does not exist here"):
        evaluate_language(model, processor.tokenizer, TEXTS, MC_ITEMS, chunk_len=9)


def test_precomputed_base_scores_give_the_same_deltas_and_must_match_the_sets(tmp_path):
    model, processor = model_and_processor(evf=True, lora=True)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA on: the Eve model's image path differs, its text path must not
            torch.nn.init.normal_(p, std=0.5)
    model.language_model.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(1.5)  # a different LM: non-zero deltas to compare
    tok, sets = processor.tokenizer, {"tiny": MC_ITEMS}
    scores = score_language(base, tok, TEXTS, sets, chunk_len=9)
    assert scores["text"]["tokens"] > 0 and scores["mc"]["tiny"]["items"] == len(MC_ITEMS)
    for m in (model, other):
        direct = evaluate_language(m, tok, TEXTS, sets, base, chunk_len=9, base_name="b")
        shared = evaluate_language(m, tok, TEXTS, sets, chunk_len=9, base_name="b", base_scores=scores)
        assert shared == direct
    assert shared["text"]["delta_perplexity"] != 0.0  # `other` really differs, so the check above can fail
    with pytest.raises(ConfigError, match="same texts"):
        evaluate_language(other, tok, TEXTS[:1], sets, chunk_len=9, base_scores=scores)
    with pytest.raises(ConfigError, match="same texts"):
        evaluate_language(other, tok, TEXTS, {"tiny": MC_ITEMS[:2]}, chunk_len=9, base_scores=scores)


def test_lm_eval_multiple_choice_matches_our_scorer(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'eve-vlm[eval]')")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from eve_vlm.eval.lm_eval_adapter import eve_hflm

    model, processor = model_and_processor(evf=True, lora=True)
    data = write_mc(tmp_path / "mc.jsonl")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "eve_tiny_mc.yaml").write_text(
        "task: eve_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    results = lm_eval.simple_evaluate(
        model=eve_hflm(model, processor.tokenizer, batch_size=4),
        tasks=["eve_tiny_mc"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    scores = mc_loglikelihoods(model, processor.tokenizer, MC_ITEMS)
    ours = mc_accuracy(MC_ITEMS, scores)
    theirs = results["results"]["eve_tiny_mc"]
    assert 100 * theirs["acc,none"] == pytest.approx(ours["acc"])
    assert 100 * theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert len(results["samples"]["eve_tiny_mc"]) == len(MC_ITEMS)
    for sample in results["samples"]["eve_tiny_mc"]:
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        assert lls == pytest.approx(scores[sample["doc_id"]], abs=1e-4)


def test_malformed_language_files_name_file_and_line(tmp_path):
    bad = [MC_ITEMS[0], {"question": "q", "choices": ["a", "b"], "label": 5}]
    with pytest.raises(DataError, match=r"mc\.jsonl, line 2: an item needs"):
        load_mc_items(write_mc(tmp_path / "mc.jsonl", bad))
    (tmp_path / "broken.jsonl").write_text(json.dumps(MC_ITEMS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken\.jsonl, line 2: malformed JSON"):
        load_mc_items(tmp_path / "broken.jsonl")


def test_eve_eval_language_cli(tmp_path, capsys):
    model, processor = model_and_processor(evf=False)
    model.language_model.save_pretrained(tmp_path / "base")
    model.add_elastic_vision_ffns("alternate")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(TEXTS[0])
    out = tmp_path / "out"
    run_cli(
        ["eval", "language", "--model", str(tmp_path / "model"), "--base", str(tmp_path / "base")]
        + ["--text", str(tmp_path / "text.txt"), "--mc", str(write_mc(tmp_path / "piqa_tiny.jsonl"))]
        + ["--out", str(out), "--chunk-len", "16", "--quiet"]
    )
    result = json.loads((out / "language_metrics.json").read_text())
    assert result["text"]["delta_perplexity"] == 0.0
    assert result["mc"]["piqa_tiny"]["delta_acc"] == 0.0 and result["mc"]["piqa_tiny"]["items"] == 4
    assert str(tmp_path / "base") in result["base"]
    # Without --base, a model that records no base LLM is refused (status 2, a message naming --base).
    argv = ["eval", "language", "--model", str(tmp_path / "model"), "--text", str(tmp_path / "text.txt")]
    assert main([*argv, "--quiet"]) == 2
    assert "--base" in capsys.readouterr().err
