"""Label masks per chat template (ChatML, Qwen2 with default system, Llama-3, plain), templates that do not
render as prefixes or drop a reply, tokens across a reply boundary, and truncation around image blocks.
The real templates of released models are tested in test_chat_templates.py."""

import pytest
from conftest import CHATML, WORDS, byte_level_bpe_tokenizer, tiny_tokenizer

from eve_vlm.data import IGNORE_INDEX, ConversationEncoder, ConversationRow
from eve_vlm.errors import ConfigError, DataError

N_IMG = 4

QWEN2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# A turn count up front (prefix renders are not prefixes of the whole), or the turns in reverse order.
TURN_COUNT = "<|im_start|>system\n{{ messages | length }}<|im_end|>\n" + CHATML
REVERSED = CHATML.replace("for message in messages", "for message in messages | reverse")
# Renders `assistant:` with the reply glued on, so a whitespace tokenizer merges across the turn boundary.
GLUED = (
    "{% for message in messages %}{{ message['role'] }}:{{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def word_tokenizer(specials, *, bos, eos, template, words=()):
    """A word-level fast tokenizer that keeps `\\n` as a token and knows `<image>`, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*specials, "\n", "user", "assistant", "system", *WORDS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Split(" ", behavior="removed")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token=bos, eos_token=eos, unk_token="<unk>"
    )
    tok.add_tokens([t for t in specials if t not in ("<pad>", "<unk>", bos, eos)], special_tokens=True)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.chat_template = template
    return tok


def chatml_tokenizer():
    tok = tiny_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def qwen2_tokenizer():
    specials = ["<pad>", "<|endoftext|>", "<|im_end|>", "<|im_start|>", "<unk>"]
    return word_tokenizer(
        specials, bos=None, eos="<|im_end|>", template=QWEN2, words=["You", "are", "helpful", "assistant."]
    )


def llama3_tokenizer():
    specials = ["<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
    specials += ["<|eot_id|>", "<unk>"]
    return word_tokenizer(specials, bos="<|begin_of_text|>", eos="<|end_of_text|>", template=LLAMA3)


TEMPLATES = {  # name: (tokenizer factory, end-of-turn token)
    "chatml": (chatml_tokenizer, "<|im_end|>"),
    "chatml_bpe": (byte_level_bpe_tokenizer, "<|im_end|>"),
    "qwen2": (qwen2_tokenizer, "<|im_end|>"),
    "llama3": (llama3_tokenizer, "<|eot_id|>"),
}


def make_row(*turns, image="/data/img.png", id="row-7"):
    """Turns alternate human, gpt, ... unless a turn is given as a (role, value) pair."""
    conversations = []
    for k, turn in enumerate(turns):
        role, value = turn if isinstance(turn, tuple) else ("human" if k % 2 == 0 else "gpt", turn)
        conversations.append({"from": role, "value": value})
    return ConversationRow(
        id=id, conversations=conversations, image=image, source="/data/train.jsonl", line=3
    )


def make_encoder(tok, **kwargs):
    kwargs.setdefault("num_image_tokens", N_IMG)
    return ConversationEncoder(tok, image_token_id=tok.convert_tokens_to_ids("<image>"), **kwargs)


def unmasked(ex):
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ex.input_ids, ex.labels, strict=True))
    return [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]


def whole_render_ids(tok, row, system_prompt=None):
    """The oracle: the whole conversation rendered once, `<image>` expanded, tokenised once."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in row.conversations]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tok.apply_chat_template(messages, tokenize=False).replace("<image>", "<image>" * N_IMG)
    return tok.encode(text, add_special_tokens=False)


ROWS = {
    "single": make_row("<image>\nwhat colour is the circle", "red"),
    "multi_turn": make_row(
        "<image>\nwhat shape is in the image", "a blue square", "is there a circle", "no", "how many", "one"
    ),
    "text_only": make_row("what is red", "a colour", "is blue a shape", "no it is a colour", image=None),
    "system": make_row(
        ("system", "describe it"), ("human", "<image>\ndescribe it"), ("gpt", "a green triangle")
    ),
}


@pytest.mark.parametrize("row_name", ROWS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_labels_are_exactly_the_replies_and_their_end_of_turn(template, row_name):
    factory, eot = TEMPLATES[template]
    tok, row = factory(), ROWS[row_name]
    ex = make_encoder(tok).encode(row)

    assert ex.input_ids == whole_render_ids(tok, row)
    replies = [t["value"] for t in row.conversations if t["from"] == "gpt"]
    expected = [
        i for r in replies for i in tok.encode(r, add_special_tokens=False) + [tok.convert_tokens_to_ids(eot)]
    ]
    assert unmasked(ex) == expected
    assert tok.unk_token_id not in expected
    n_images = 1 if row.image else 0
    assert (
        ex.num_image_tokens_in_ids
        == ex.input_ids.count(tok.convert_tokens_to_ids("<image>"))
        == N_IMG * n_images
    )
    assert (ex.id, ex.image) == (row.id, row.image)


def test_newlines_and_headers_after_the_end_of_turn_are_masked():
    tok = llama3_tokenizer()
    ex = make_encoder(tok).encode(ROWS["multi_turn"])
    tokens = tok.convert_ids_to_tokens(ex.input_ids)
    labelled = [t for t, lab in zip(tokens, ex.labels, strict=True) if lab != IGNORE_INDEX]
    assert tokens[0] == "<|begin_of_text|>" and "\n" in tokens
    assert (
        "\n" not in labelled and "<|start_header_id|>" not in labelled and "<|end_of_text|>" not in labelled
    )
    assert labelled.count("<|eot_id|>") == 3


def test_qwen2_default_system_message_and_system_prompt():
    tok = qwen2_tokenizer()
    row = ROWS["single"]
    default = make_encoder(tok).encode(row)
    assert tok.decode(default.input_ids).startswith("<|im_start|> system \n You are a helpful assistant.")
    custom = make_encoder(tok, system_prompt="describe it").encode(row)
    assert custom.input_ids == whole_render_ids(tok, row, system_prompt="describe it")
    assert "You" not in tok.convert_ids_to_tokens(custom.input_ids)
    assert unmasked(default) == unmasked(custom)


def test_plain_template_is_image_caption_eos():
    tok = chatml_tokenizer()
    row = make_row("<image>\ndescribe it", "a red circle")
    ex = make_encoder(tok, template="plain").encode(row)
    image_id, caption = (
        tok.convert_tokens_to_ids("<image>"),
        tok.encode("a red circle", add_special_tokens=False),
    )
    assert ex.input_ids == [image_id] * N_IMG + caption + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * N_IMG + caption + [tok.eos_token_id]


def test_template_that_drops_an_assistant_turn_raises_naming_the_row():
    tok = chatml_tokenizer()
    tok.chat_template = CHATML.replace(
        "{% for message in messages %}", "{% for message in messages if message['role'] != 'assistant' %}"
    )
    with pytest.raises(DataError, match="row id 'row-7'.*drops or rewrites turn 1 .*'a blue square'"):
        make_encoder(tok).encode(ROWS["multi_turn"])


def test_template_whose_prefix_renders_differ_still_labels_the_replies():
    """A turn count up front changes the render of every prefix; only the whole render counts."""
    tok = chatml_tokenizer()
    tok.chat_template = TURN_COUNT
    row = ROWS["multi_turn"]
    ex = make_encoder(tok).encode(row)
    replies = [t["value"] for t in row.conversations if t["from"] == "gpt"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert unmasked(ex) == [i for r in replies for i in tok.encode(r, add_special_tokens=False) + [eot]]


def test_render_with_a_token_across_the_reply_boundary_raises_naming_the_row():
    tok = chatml_tokenizer()
    tok.chat_template = GLUED
    with pytest.raises(DataError, match="row id 'row-7'.*does not start and end on token boundaries"):
        make_encoder(tok).encode(ROWS["text_only"])


def test_template_that_reorders_turns_raises_naming_the_row():
    tok = chatml_tokenizer()
    tok.chat_template = REVERSED
    with pytest.raises(DataError, match="row id 'row-7'.*drops or rewrites turn"):
        make_encoder(tok).encode(ROWS["multi_turn"])


def test_truncation_cuts_text_after_the_image_block_only():
    tok = chatml_tokenizer()
    row = make_row("<image>\ndescribe it", "a red circle and a blue square and a green triangle")
    full = make_encoder(tok).encode(row)
    image_end = max(k for k, t in enumerate(full.input_ids) if t == tok.convert_tokens_to_ids("<image>")) + 1
    cut = make_encoder(tok, max_length=len(full.input_ids) - 5).encode(row)
    assert cut.input_ids == full.input_ids[: len(full.input_ids) - 5]
    assert cut.labels == full.labels[: len(full.input_ids) - 5]
    assert cut.num_image_tokens_in_ids == N_IMG and image_end < len(cut.input_ids)

    with pytest.raises(DataError, match=f"row id 'row-7'.*too small for {N_IMG} image tokens"):
        make_encoder(tok, max_length=image_end - 1).encode(row)
    with pytest.raises(DataError, match="row id 'row-7'.*no label token is left"):
        make_encoder(tok, max_length=image_end + 2).encode(row)  # room for the header, not the reply


def test_image_marker_must_match_the_image():
    tok = chatml_tokenizer()
    with pytest.raises(DataError, match=r"row id 'row-7'.*0 image tokens.*expected 4"):
        make_encoder(tok).encode(make_row("describe it", "red"))  # image, but no marker
    with pytest.raises(DataError, match=r"row id 'row-7'.*4 image tokens.*expected 0"):
        make_encoder(tok).encode(make_row("<image>\ndescribe it", "red", image=None))


def test_image_token_must_be_registered():
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="add_tokens"):
        ConversationEncoder(tok, image_token_id=tok.vocab_size, num_image_tokens=N_IMG)
    tok.chat_template = None
    tok.add_tokens(["<image>"], special_tokens=True)
    with pytest.raises(ConfigError, match="no chat template"):
        make_encoder(tok)
    make_encoder(tok, template="plain")
