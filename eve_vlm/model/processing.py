"""`EveProcessor`: image processor + tokenizer; expands each `<image>` into the model's N placeholder tokens.

The image processor is the tower folder's own (its `preprocessor_config.json`: mean, std, resize, centre crop;
see `tower.build_image_processor`), PIL-backed (no torchvision), giving the tower's square input. With
`image_aspect_ratio="pad"` each image is first padded to a square with the processor's mean colour, as
LLaVA-1.5's `expand2square` does, so the crop cuts nothing off. The `<image>` placeholder is added to
the tokenizer as a special token; its id may lie past the LM's embedding table, which the model handles (it
never embeds the placeholder, it overwrites it with image features).
"""

from __future__ import annotations

import json
from functools import cached_property

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import (
    AutoTokenizer,
    BatchFeature,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.image_processing_utils import BaseImageProcessor

from eve_vlm.errors import ConfigError, ImageTokenMismatchError
from eve_vlm.model.tower import build_image_processor

IMAGE_ASPECT_RATIOS = ("resize", "pad")

# Template variables the generation prompt of a conversation with images is rendered with. Training renders a
# conversation whole, and Qwen3's template writes an empty think block before the last reply; with
# `enable_thinking=False` its generation prompt ends with that same empty block, so the model is asked in the
# context it was trained in (without it the prompt stops before `<think>`). Templates that do not read a
# variable ignore it. Text-only conversations render with the template's defaults, as the base LLM's chat.
GENERATION_TEMPLATE_KWARGS = {"enable_thinking": False}


def expand_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """`image` centred on a square canvas of its longer side filled with `colour` (LLaVA's `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# Dedicated padding tokens some tokenizers carry without declaring them as `pad_token` (Llama 3.1+, Qwen).
PAD_TOKEN_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")


def ensure_pad_token(tokenizer) -> None:
    """Gives a tokenizer without a pad token (Llama 3.x, Mistral) one, in place: a dedicated padding token of
    its vocabulary if it has one (`PAD_TOKEN_CANDIDATES`), else its end-of-sequence token. Padding positions
    are masked by position (attention mask, labels -100), so the id only has to exist; it is saved with the
    processor.

    Raises:
        ConfigError: The tokenizer has neither a pad nor an end-of-sequence token.
    """
    if tokenizer is None or tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    pad = next((t for t in PAD_TOKEN_CANDIDATES if t in vocab), tokenizer.eos_token)
    if pad is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} has no pad token and no end-of-sequence token to pad with; set "
            "`tokenizer.pad_token` before building the processor."
        )
    tokenizer.pad_token = pad


def without_added_token(tokenizer, token: str):
    """`tokenizer` as it was before `token` was added to it: the base LLM's tokenizer, for text-only inputs.

    `EveProcessor.from_parts` registers `<image>` as an added special token, so the registered tokenizer turns a
    literal "<image>" typed in a text into the placeholder id where the base LLM's tokenizer reads the
    characters. The copy is rebuilt from the fast tokenizer's own serialisation with that one added token
    removed (vocabulary, merges, normaliser, pre-tokeniser and the other special tokens unchanged). A tokenizer
    that does not hold `token` as an added token, or a slow (Python) tokenizer, is returned as it is.
    """
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if token not in added or backend is None:
        return tokenizer
    state = json.loads(backend.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] != token]
    kwargs = {
        k: v
        for k, v in tokenizer.init_kwargs.items()
        if k
        not in ("tokenizer_object", "tokenizer_file", "vocab_file", "merges_file", "backend", "name_or_path")
    }
    if "added_tokens_decoder" in kwargs:
        kwargs["added_tokens_decoder"] = {
            i: t for i, t in kwargs["added_tokens_decoder"].items() if str(t) != token
        }
    text = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), **kwargs)
    for name in ("pad_token", "padding_side", "chat_template"):
        setattr(text, name, getattr(tokenizer, name))
    return text


class EveProcessor(ProcessorMixin):
    """Prepares text and images for `EveForConditionalGeneration`.

    Args:
        image_processor: Resizes (and crops) and normalises images to the tower's input.
        tokenizer: The LM's tokenizer, with `image_token` registered as a special token.
        num_image_tokens: Placeholder tokens per image (`EveConfig.num_image_tokens`).
        image_token: The placeholder text.
        chat_template: Defaults to the tokenizer's own.
        system_prompt: The system message the model was instruction-tuned with (a stage recipe's
            `data.system_prompt`); prompts for image requests built by `eve chat` and the evaluations use it.
            None = the chat template's default. Text-only requests never use it: they render as the base
            LLM's chat does.
        image_aspect_ratio: `resize`: images go to the image processor as they are (its resize and centre
            crop); `pad`: each image is first padded to a square with the processor's mean colour (LLaVA-1.5's
            `image_aspect_ratio: pad`), so nothing is cropped or distorted.
    """

    attributes = ["image_processor", "tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 1,
        image_token: str = "<image>",
        chat_template: str | None = None,
        system_prompt: str | None = None,
        image_aspect_ratio: str = "resize",
        **kwargs,
    ):
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ConfigError(
                f"image_aspect_ratio={image_aspect_ratio!r} is unknown; use one of {', '.join(IMAGE_ASPECT_RATIOS)}."
            )
        self.image_aspect_ratio = image_aspect_ratio
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.system_prompt = system_prompt
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        ensure_pad_token(tokenizer)  # batched prompts and training batches are padded
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_parts(
        cls,
        *,
        tokenizer,
        vision_config: PreTrainedConfig,
        image_size: int,
        num_image_tokens: int,
        image_token="<image>",
        tower_folder: str | None = None,
        image_aspect_ratio: str = "resize",
    ) -> EveProcessor:
        """Builds a processor for a new model, registering the placeholder token with the tokenizer.

        The image processor is the one of `tower_folder` when it has a `preprocessor_config.json` (see
        `tower.build_image_processor`).
        """
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([image_token], special_tokens=True)
        return cls(
            image_processor=build_image_processor(vision_config, image_size, tower_folder),
            tokenizer=tokenizer,
            num_image_tokens=num_image_tokens,
            image_token=image_token,
            image_aspect_ratio=image_aspect_ratio,
        )

    @cached_property
    def text_tokenizer(self):
        """The base LLM's tokenizer (`tokenizer` without the `<image>` placeholder, see `without_added_token`):
        text-only inputs and the language evaluations tokenise with it, so a literal "<image>" in a text stays
        text, as it is for the base LLM."""
        return without_added_token(self.tokenizer, self.image_token)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def chat_prompt(self, content: str, system: str | None = None, history: list[dict] | None = None) -> str:
        """One user turn rendered with the chat template and its generation prompt.

        The system message is `system` if given; else, for a conversation with an image, `self.system_prompt`;
        else the template's default, so a text-only turn renders as it does for the base LLM.

        Args:
            content: The user turn's text, with `<image>` where an image goes.
            system: The system message (default: see above).
            history: Earlier `{"role", "content"}` messages (user and assistant turns, no system message),
                rendered before `content`; an `<image>` in them counts as the conversation's image.
        """
        messages = [*(history or []), {"role": "user", "content": content}]
        with_images = any(self.image_token in m["content"] for m in messages)
        if system is None and with_images:
            system = self.system_prompt
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return self.generation_prompt(messages, with_images=with_images)

    def generation_prompt(self, messages: list[dict], with_images: bool) -> str:
        """`messages` rendered with the chat template and its generation prompt: with images as training
        rendered the turns before a reply (`GENERATION_TEMPLATE_KWARGS`), else with the template's defaults."""
        kwargs = GENERATION_TEMPLATE_KWARGS if with_images else {}
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )

    def expand_image_tokens(self, text: str) -> str:
        """Replaces each `<image>` by `num_image_tokens` copies of it."""
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True, **kwargs) -> BatchFeature:
        """Tokenises `text` (str or list) and processes `images` (one per `<image>`, in order).

        Without images the call is text-only: `text` is tokenised by `text_tokenizer`, as the base LLM does, so
        a literal "<image>" in it stays text and becomes no placeholder.

        Raises:
            ImageTokenMismatchError: when images are given and the number of `<image>` markers differs from
                the number of images.
        """
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        if not images:
            return BatchFeature(
                data=dict(
                    self.text_tokenizer(
                        texts,
                        return_tensors=return_tensors,
                        padding=padding,
                        add_special_tokens=False,
                        **kwargs,
                    )
                ),
                tensor_type=return_tensors,
            )
        markers = sum(t.count(self.image_token) for t in texts)
        if markers != len(images):
            raise ImageTokenMismatchError(
                f"The text has {markers} '{self.image_token}' marker(s) but {len(images)} image(s) were given; "
                "give one image per marker, in order."
            )
        data = dict(
            self.tokenizer(
                [self.expand_image_tokens(t) for t in texts],
                return_tensors=return_tensors,
                padding=padding,
                add_special_tokens=False,
                **kwargs,
            )
        )
        if images:
            data["pixel_values"] = self.pixel_values(images, return_tensors)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def load_images(self, paths: list[str]) -> torch.Tensor:
        """`pixel_values` (N, 3, H, W) for image files, in order (the collators' image loader)."""
        images = []
        for path in paths:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        return self.pixel_values(images)

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        """The image processor's mean as an RGB colour (0-255): it normalises to 0."""
        processor: BaseImageProcessor = self.image_processor
        return tuple(round(float(m) * 255) for m in processor.image_mean)

    def pixel_values(self, images: list, return_tensors="pt") -> torch.Tensor:
        """`pixel_values` (N, 3, H, W) of PIL images, padded to squares first with `image_aspect_ratio="pad"`."""
        if self.image_aspect_ratio == "pad":
            images = [expand_to_square(image.convert("RGB"), self.pad_colour) for image in images]
        return self.image_processor(images=images, return_tensors=return_tensors)["pixel_values"]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def load_tokenizer(path: str):
    """The tokenizer of a saved Eve model or LLM folder."""
    return AutoTokenizer.from_pretrained(path)
