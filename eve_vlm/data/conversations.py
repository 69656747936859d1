"""Renders a conversation with the tokenizer's own chat template and builds the label mask in the same loop.

Follows torchtune's `tokenize_messages` (tokens and labels built together) but renders with
`tokenizer.apply_chat_template`, so any Hugging Face LM's template works with no per-LLM code (LLaVA's
`preprocess_llama_2`, `preprocess_v1`, ... are what this replaces). A row is rendered once and tokenised once:

    text = render(messages)                      # the whole conversation, as the model sees it
    ids, offsets = tokenizer(text, return_offsets_mapping=True)

Each assistant reply's character span in `text` is found by looking up the turns' texts in order, and mapped to
tokens through the offsets; the reply's tokens and the end-of-turn token right after it (only whitespace
between) are labelled, everything else is masked. Nothing assumes that the render of the first turns is a
prefix of the whole render, so templates that render a turn differently by its position work: Qwen3's empty
think block before the last reply only, Gemma's system text folded into the first user turn, Mistral's into
the last, Llama-3's date header, SentencePiece prefix spaces. A template that drops or rewrites a turn's
text, or a token that spans a reply and the template text around it, raises `DataError` naming the row,
never a silent "tokenization mismatch".

`<image>` stays one special token while rendering and tokenising; `encode_compact` keeps it so (one
placeholder per image, what the data cache stores) and `encode` replaces each one by `num_image_tokens`
copies (the model overwrites them with image features); `expand_image_placeholders` does the same for a
compact example, so both give the same ids. The stage-1 `plain` template is
LLaVA's: image tokens + the first gpt reply (the caption) + eos, labels on the caption and eos only.

Truncation to `max_length` only cuts text after the last image block, never an image block.
"""

from __future__ import annotations

from dataclasses import dataclass

from eve_vlm.data.llava import ConversationRow
from eve_vlm.errors import ConfigError, DataError

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
TEMPLATES = ("chat", "plain")


@dataclass
class EncodedExample:
    """A tokenised conversation.

    Attributes:
        input_ids: Token ids, each `<image>` expanded to `num_image_tokens` image-token ids.
        labels: `input_ids` on assistant replies and their end-of-turn tokens, -100 elsewhere.
        image: Absolute path of the row's image, or None.
        id: The row id.
        num_image_tokens_in_ids: How many image-token ids `input_ids` holds.
    """

    input_ids: list[int]
    labels: list[int]
    image: str | None
    id: str
    num_image_tokens_in_ids: int


@dataclass
class CompactExample:
    """A tokenised conversation with one image-token id per image (not yet expanded).

    Attributes:
        input_ids: Token ids, one image-token id per image.
        labels: Same length as `input_ids`; -100 on everything but the replies.
        image: Absolute path of the row's image, or None.
        id: The row id.
        length: Length of `input_ids` once each image-token id is expanded.
    """

    input_ids: list[int]
    labels: list[int]
    image: str | None
    id: str
    length: int


def expand_image_placeholders(
    ids: list[int], labels: list[int], image_token_id: int, num_image_tokens: int
) -> tuple[list[int], list[int]]:
    """Replaces each `image_token_id` in `ids` by `num_image_tokens` of them (labels -100)."""
    out_ids, out_labels = [], []
    for t, lab in zip(ids, labels, strict=True):
        if t == image_token_id:
            out_ids += [t] * num_image_tokens
            out_labels += [IGNORE_INDEX] * num_image_tokens
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


def row_where(row: ConversationRow) -> str:
    """`file, line N, row id 'x'`, for error messages."""
    return f"{row.source}, line {row.line}, row id {row.id!r}"


def to_messages(row: ConversationRow, system_prompt: str | None) -> list[dict]:
    """The row's turns as chat-template messages (`role` user/assistant/system, `content`)."""
    messages = []
    for turn in row.conversations:
        role = turn.get("from", turn.get("role"))
        if role not in ROLES:
            raise DataError(f"{row_where(row)}: unknown role {role!r}; use human, gpt or system.")
        messages.append({"role": ROLES[role], "content": turn.get("value", turn.get("content"))})
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


class ConversationEncoder:
    """Turns a `ConversationRow` into `input_ids` and `labels`.

    Args:
        tokenizer: A Hugging Face tokenizer with `image_token` registered as a single special token and, for
            `template="chat"`, a chat template.
        image_token: The placeholder text in the conversations.
        image_token_id: Its id in `tokenizer`.
        num_image_tokens: Image-token ids per image (`EveConfig.num_image_tokens`).
        template: "chat" (the tokenizer's chat template) or "plain" (image + caption, for stage-1 alignment).
        max_length: Longest `input_ids`; longer examples lose text after their last image block.
        system_prompt: System message for rows that have none (default: whatever the template does).

    Raises:
        ConfigError: when `image_token` is not one token with id `image_token_id`, the template is unknown,
            or `template="chat"` and the tokenizer has no chat template.
    """

    def __init__(
        self,
        tokenizer,
        *,
        image_token: str = "<image>",
        image_token_id: int,
        num_image_tokens: int,
        template: str = "chat",
        max_length: int = 2048,
        system_prompt: str | None = None,
    ):
        if template not in TEMPLATES:
            raise ConfigError(f"template={template!r}; use one of {TEMPLATES}")
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("The tokenizer has no chat template; give it one, or use template='plain'.")
        if template == "chat" and not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                f"{type(tokenizer).__name__} is not a fast tokenizer; template='chat' places labels through "
                "its offsets (return_offsets_mapping): load the tokenizer with use_fast=True."
            )
        if template == "plain" and tokenizer.eos_token_id is None:
            raise ConfigError("template='plain' needs a tokenizer with an eos token to end each caption.")
        if tokenizer.encode(image_token, add_special_tokens=False) != [image_token_id]:
            raise ConfigError(
                f"{image_token!r} is not the single token {image_token_id} in this tokenizer; register it "
                f"with tokenizer.add_tokens([{image_token!r}], special_tokens=True) "
                "(EveProcessor.from_parts does)."
            )
        if num_image_tokens < 1 or max_length < 1:
            raise ConfigError(f"num_image_tokens={num_image_tokens} and max_length={max_length} must be >= 1")
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.template = template
        self.max_length = max_length
        self.system_prompt = system_prompt
        vocab = tokenizer.get_vocab()
        self.end_of_turn_ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        if tokenizer.eos_token_id is not None:
            self.end_of_turn_ids.add(tokenizer.eos_token_id)

    def encode(self, row: ConversationRow) -> EncodedExample:
        """Tokenises `row`, masks everything but the assistant replies and expands the image placeholder.

        Raises:
            DataError: as `encode_compact`.
        """
        compact = self.encode_compact(row)
        ids, labels = self.expand_images(compact.input_ids, compact.labels)
        return EncodedExample(
            input_ids=ids,
            labels=labels,
            image=row.image,
            id=row.id,
            num_image_tokens_in_ids=ids.count(self.image_token_id),
        )

    def encode_compact(self, row: ConversationRow) -> CompactExample:
        """Tokenises `row` and masks everything but the assistant replies, one image-token id per image;
        truncation counts each image as `num_image_tokens` tokens.

        Raises:
            DataError: naming the row, when the template drops or rewrites a turn's text, a token spans a
                reply and the template text around it, the image-token count is wrong, the image blocks do not fit in
                `max_length`, or no label is left.
        """
        if self.template == "plain":
            ids, labels = self.encode_plain(row)
        else:
            ids, labels = self.encode_chat(row)
        count = ids.count(self.image_token_id)
        if count != (1 if row.image else 0):
            raise DataError(
                f"{row_where(row)}: {count * self.num_image_tokens} image tokens after rendering, expected "
                f"{self.num_image_tokens if row.image else 0} ({'one' if row.image else 'no'} image); the "
                f"row or the template drops or adds {self.image_token!r}."
            )
        ids, labels = self.truncate(row, ids, labels)
        length = len(ids) + (self.num_image_tokens - 1) * count
        return CompactExample(input_ids=ids, labels=labels, image=row.image, id=row.id, length=length)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_plain(self, row: ConversationRow) -> tuple[list[int], list[int]]:
        """LLaVA's plain format: `<image>` + caption + eos; labels on the caption and eos."""
        messages = to_messages(row, system_prompt=None)
        caption = next((m["content"] for m in messages if m["role"] == "assistant"), None)
        if caption is None:
            raise DataError(f"{row_where(row)}: no gpt turn to use as the caption.")
        prompt = [self.image_token_id] if row.image else []
        reply = self.tokenize(caption.replace(self.image_token, "").strip()) + [self.tokenizer.eos_token_id]
        return prompt + reply, [IGNORE_INDEX] * len(prompt) + reply

    def reply_spans(self, row: ConversationRow, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """The character span of each assistant reply in `text` (the render of `messages`).

        User and assistant contents are looked up in order (whitespace-stripped, as templates often trim
        them); system messages are skipped, since templates move them (Gemma folds the system message into
        the first user turn, Mistral into the last).
        """
        spans, cursor = [], 0
        for k, message in enumerate(messages):
            if message["role"] == "system":
                continue
            content = (message["content"] or "").strip()
            start = text.find(content, cursor)
            if start < 0:
                what = "assistant reply" if message["role"] == "assistant" else "user message"
                raise DataError(
                    f"{row_where(row)}: the chat template drops or rewrites turn {k} ({what} "
                    f"{content[:40]!r}): its text is not in the render, in order, so its labels cannot be "
                    "placed; fix the row or use a template that renders every turn's text as given."
                )
            cursor = start + len(content)
            if message["role"] == "assistant":
                spans.append((start, cursor))
        return spans

    def encode_chat(self, row: ConversationRow) -> tuple[list[int], list[int]]:
        """Tokens and labels from one render and one tokenisation of the whole conversation.

        Each reply's character span is mapped to tokens through the tokenizer's offsets; the label runs from
        the reply's first token through the end-of-turn token that follows it (only whitespace between).
        """
        messages = to_messages(row, self.system_prompt)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        k = 0
        for start, end in self.reply_spans(row, messages, text):
            while k < len(ids) and offsets[k][1] <= start:
                k += 1
            first = k
            while k < len(ids) and offsets[k][0] < end:
                k += 1
            if first == k or text[offsets[first][0] : start].strip() or text[end : offsets[k - 1][1]].strip():
                raise DataError(
                    f"{row_where(row)}: the reply {text[start:end][:40]!r} does not start and end on token "
                    "boundaries (a token spans the reply and the template text around it), so it cannot be "
                    "labelled; check the tokenizer and template."
                )
            last = k
            while (
                last < len(ids)
                and ids[last] not in self.end_of_turn_ids
                and self.is_blank(text, offsets[last])
            ):
                last += 1  # whitespace the template puts between the reply and its end-of-turn token
            last = last + 1 if last < len(ids) and ids[last] in self.end_of_turn_ids else k
            labels[first:last] = ids[first:last]
        return ids, labels

    @staticmethod
    def is_blank(text: str, offset: tuple[int, int]) -> bool:
        return not text[offset[0] : offset[1]].strip()

    def expand_images(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Replaces each image-token id by `num_image_tokens` of them (labels -100)."""
        return expand_image_placeholders(ids, labels, self.image_token_id, self.num_image_tokens)

    def truncate(
        self, row: ConversationRow, ids: list[int], labels: list[int]
    ) -> tuple[list[int], list[int]]:
        """Cuts text after the last image block down to `max_length` (each image-token id counting as
        `num_image_tokens` tokens), keeping image blocks whole."""
        extra = self.num_image_tokens - 1  # tokens each image-token id adds once expanded
        images = ids.count(self.image_token_id)
        last = max((k for k, t in enumerate(ids) if t == self.image_token_id), default=-1)
        image_end = last + 1 + extra * images if images else 0  # expanded position after the last image
        if image_end >= self.max_length and len(ids) + extra * images > self.max_length:
            raise DataError(
                f"{row_where(row)}: max_length {self.max_length} is too small for "
                f"{images * self.num_image_tokens} image tokens ending at position {image_end} plus at least "
                "one label token; raise max_length."
            )
        keep = self.max_length - extra * images
        ids, labels = ids[:keep], labels[:keep]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise DataError(
                f"{row_where(row)}: no label token is left within max_length {self.max_length} "
                f"({len(ids) + extra * images} tokens kept); raise max_length or shorten the prompt."
            )
        return ids, labels
