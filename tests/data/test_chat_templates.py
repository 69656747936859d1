"""Label masks with the real chat templates of released instruction-tuned LMs (Qwen2.5, Qwen3, Llama-3.1,
Mistral-Instruct v0.3, Gemma-3, Phi-3), stored in tests/fixtures/chat_templates with their special tokens.

The tokenizer is a tiny BPE trained in memory (byte-level, as GPT-2/Qwen/Llama-3, or SentencePiece-style
Metaspace, as Mistral/Gemma/Phi-3) that carries the model's special tokens and template; nothing is
downloaded. For multi-turn rows with and without a system turn, the labelled tokens decode to exactly the
assistant replies, each followed by its end-of-turn marker.
"""

import json
import string
from pathlib import Path

import pytest

from eve_vlm.data import IGNORE_INDEX, ConversationEncoder, ConversationRow

FIXTURES = Path(__file__).parent.parent / "fixtures" / "chat_templates"
SPECIALS = json.loads((FIXTURES / "special_tokens.json").read_text())
N_IMG = 3

TURNS = [
    ("human", "<image>\nWhat shape is in the image?"),
    ("gpt", "A blue square."),
    ("human", "Is there a circle?"),
    ("gpt", "No, there is no circle."),
    ("human", "How many squares?"),
    ("gpt", "One square."),
]
ROWS = {
    "multi_turn": TURNS,
    "system": [("system", "Answer briefly."), *TURNS[:4]],
    "single": TURNS[:2],
}


def tiny_tokenizer(name: str, kind: str):
    """A BPE tokenizer trained on a few sentences, with the model's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = SPECIALS[name]
    backend = Tokenizer(models.BPE(unk_token=None if kind == "byte_level" else "<unk>", byte_fallback=False))
    if kind == "byte_level":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set(string.printable) | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>"] if kind != "byte_level" else [], initial_alphabet=alphabet
    )
    corpus = [v for rows in ROWS.values() for _, v in rows] + ["system user assistant model Today Date"]
    backend.train_from_iterator(corpus * 3, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>" if kind != "byte_level" else None
    )
    tok.add_special_tokens(
        {"additional_special_tokens": spec["special_tokens"] + ["<image>"]}
        | {k: spec[k] for k in ("bos_token", "eos_token", "pad_token") if spec[k]}
    )
    tok.chat_template = (FIXTURES / f"{name}.jinja").read_text()
    return tok


def make_row(turns):
    return ConversationRow(
        id="row-1",
        conversations=[{"from": r, "value": v} for r, v in turns],
        image="/data/img.png",
        source="/data/train.jsonl",
        line=1,
    )


def labelled_runs(ex):
    """The labelled tokens, as runs of consecutive positions."""
    runs, run = [], []
    for t, lab in zip(ex.input_ids, ex.labels, strict=True):
        assert lab in (IGNORE_INDEX, t)
        if lab != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs, run = [*runs, run], []
    return runs + ([run] if run else [])


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
@pytest.mark.parametrize("row_name", ROWS)
@pytest.mark.parametrize("name", SPECIALS)
def test_labels_decode_to_the_replies_and_their_end_of_turn(name, row_name, kind):
    tok, turns = tiny_tokenizer(name, kind), ROWS[row_name]
    encoder = ConversationEncoder(
        tok, image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=N_IMG
    )
    ex = encoder.encode(make_row(turns))

    eot = SPECIALS[name]["end_of_turn"]
    replies = [v for r, v in turns if r == "gpt"]
    assert [tok.decode(run).strip() for run in labelled_runs(ex)] == [f"{r}{eot}" for r in replies]
    assert ex.num_image_tokens_in_ids == N_IMG
    assert tok.unk_token_id is None or tok.unk_token_id not in ex.input_ids


def test_qwen3_think_block_of_the_last_reply_is_masked():
    """Qwen3 writes an empty think block before the last reply only, so the render of the first turns is
    not a prefix of the whole render: labels placed by prefix renders could not be built for this row."""
    tok = tiny_tokenizer("qwen3", "byte_level")
    messages = [{"role": "user" if r == "human" else "assistant", "content": v} for r, v in TURNS[:4]]
    whole = tok.apply_chat_template(messages, tokenize=False)
    first_two = tok.apply_chat_template(messages[:2], tokenize=False)
    assert whole.count("<think>") == 1 and not whole.startswith(first_two)

    encoder = ConversationEncoder(
        tok, image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=N_IMG
    )
    ex = encoder.encode(make_row(TURNS[:4]))
    labelled = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX])
    assert "<think>" in tok.decode(ex.input_ids) and "think" not in labelled
    assert [tok.decode(run) for run in labelled_runs(ex)] == [
        "A blue square.<|im_end|>",
        "No, there is no circle.<|im_end|>",
    ]


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
@pytest.mark.parametrize("name", SPECIALS)
def test_the_generation_prompt_of_an_image_question_is_what_training_rendered_before_the_reply(name, kind):
    """A question with an image is prompted with the context training put before its reply: the prompt is a
    prefix of the training render of the same turns plus the reply. Qwen3 is the regression case: trained
    with an empty think block before the last reply, it was prompted without one."""
    from conftest import tiny_eve_config

    from eve_vlm.model import EveProcessor

    config = tiny_eve_config()
    processor = EveProcessor.from_parts(
        tokenizer=tiny_tokenizer(name, kind),
        vision_config=config.vision_config,
        image_size=config.image_size,
        num_image_tokens=N_IMG,
    )
    for turns in (TURNS[:2], TURNS[:4]):
        messages = [{"role": "user" if r == "human" else "assistant", "content": v} for r, v in turns]
        trained = processor.tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = processor.generation_prompt(messages[:-1], with_images=True)
        assert trained.startswith(prompt), (prompt, trained)
        assert trained[len(prompt) :].lstrip().startswith(turns[-1][1])
