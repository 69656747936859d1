"""Decoder families x towers: stage 1 -> 2 (LoRA) -> 3 (EVF) in-process on tiny random configs, with the elastic
guarantee checked against the base transformers LM after every stage.

Each model is built as `eve train` builds stage 1: from an LLM folder (the family's tiny LM saved with
`save_pretrained` and a tokenizer) and a tower folder in the layout the real checkpoint has
(`tower_folders.LAYOUTS`: full CLIPModel and SiglipModel folders, SigLIP at a size that is not a multiple of
the patch, a bare Dinov2Model), each with its `preprocessor_config.json`. The family axis lists every family
the README names as tested.
"""

import copy

import pytest
import torch
import yaml
from conftest import IMAGE_TOKEN_ID, VOCAB, image_batch, text_batch, tiny_tokenizer, tiny_vision_config
from torch.testing import assert_close
from tower_folders import LAYOUTS, save_tower
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from eve_vlm.errors import ConfigError
from eve_vlm.model import EveConfig, EveForConditionalGeneration
from eve_vlm.model.decoder_layer import EvfDecoderLayer
from eve_vlm.model.lora import lora_layers
from eve_vlm.train import stages
from eve_vlm.train.recipe import load_recipe

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=8)  # windows shorter than the test sequences
FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    "gemma2": lambda: Gemma2Config(**COMMON, **GEMMA),  # sandwich norms, scaled embeddings, soft-capping
    "gemma3": lambda: Gemma3TextConfig(**COMMON, **GEMMA),  # sandwich norms, QK norms, scaled embeddings
    "phi3": lambda: Phi3Config(**COMMON),  # fused qkv_proj and gate_up_proj
}
LORA_TARGETS = {"phi3": ["qkv_proj", "gate_up_proj"]}  # the others: q_proj, v_proj, up_proj
TOWERS = list(LAYOUTS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """`folders(kind, name)`: the saved folder of an LLM family (`kind="lm"`) or a tower layout, made once."""
    made = {}

    def folder(kind: str, name: str):
        if (kind, name) not in made:
            path = tmp_path_factory.mktemp(f"{kind}-{name}")
            if kind == "lm":
                torch.manual_seed(0)
                AutoModelForCausalLM.from_config(FAMILIES[name]()).save_pretrained(path)
                tiny_tokenizer().save_pretrained(path)
            else:
                save_tower(path, name)
            made[kind, name] = path
        return made[kind, name]

    return folder


def family_model(folders, family: str, tower: str = "dinov2"):
    """A tiny Eve model of `family` built from saved folders as stage 1 builds it, and the base LM loaded from
    its folder, both in eval mode. The placeholder id is moved past the LM vocabulary (as a real tokenizer's
    added `<image>` is), so `conftest.text_batch` never holds it."""
    recipe = folders("lm", family).parent / f"stage1-{family}-{tower}.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "stage": 1,
                "model": {
                    "language_model": str(folders("lm", family)),
                    "vision_tower": str(folders("tower", tower)),
                },
                "data": {"sources": [{"path": "unused.json"}], "template": "plain"},
                "trainable": [{"pattern": "^projector\\."}],
                "training": {"output_dir": str(recipe.parent / "out"), "max_steps": 1},
            }
        )
    )
    model, _ = stages.build_from_parts(load_recipe(recipe))
    model.config.image_token_id = IMAGE_TOKEN_ID
    base = AutoModelForCausalLM.from_pretrained(folders("lm", family)).eval()
    return model.eval(), base


def train_steps(model, trainable: str, steps: int = 2):
    """A few AdamW steps on a synthetic image batch, training only the parameters whose name contains one of
    the `|`-separated words of `trainable`."""
    keys = trainable.split("|")
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in keys))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, trainable
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    ids, pixels = image_batch(model.config, seed=11)
    for _ in range(steps):
        loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def assert_text_path_is_base(model, base):
    ids = text_batch(seed=3)
    with torch.no_grad():
        ours = model(input_ids=ids, output_hidden_states=True)
        theirs = base(input_ids=ids, output_hidden_states=True)
    assert torch.equal(ours.logits, theirs.logits)
    assert (
        len(ours.hidden_states) == len(theirs.hidden_states) == model.config.text_config.num_hidden_layers + 1
    )
    for ours_h, theirs_h in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert torch.equal(ours_h, theirs_h)


def stage3(model, **options):
    """Adds EVF layers on 0, 2 and makes the vision FFNs and routers differ from a copy of the language FFN."""
    layers = model.add_elastic_vision_ffns("alternate", **options)
    torch.manual_seed(5)
    for evf in model.evf_layers.values():
        torch.nn.init.normal_(evf.router.weight, std=1.0)
        for p in evf.vision_ffns.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    return layers


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_stages_keep_the_text_path_of_the_base_lm(folders, family, tower):
    model, base = family_model(folders, family, tower)
    assert_text_path_is_base(model, base)

    train_steps(model, "projector")  # stage 1
    assert_text_path_is_base(model, base)

    targets = LORA_TARGETS.get(family, ["q_proj", "v_proj", "up_proj"])
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)  # stage 2
    train_steps(model, "projector|lora_")
    assert any(bool(layer.lora_B["default"].weight.any()) for layer in lora_layers(model.language_model))
    assert_text_path_is_base(model, base)

    plain = copy.deepcopy(model)
    layer_class = type(model.language_model.get_decoder().layers[0])
    model.add_elastic_vision_ffns("alternate", combine="hard")  # stage 3
    converted = model.language_model.get_decoder().layers
    assert isinstance(converted[0], EvfDecoderLayer) and isinstance(converted[0], layer_class)
    assert type(converted[1]) is layer_class
    ids, pixels = image_batch(model.config)
    default = next(iter(model.evf_layers.values())).allocation
    with torch.no_grad():  # right after insertion, `hard` combine: the model computes what it computed before
        expected = plain(input_ids=ids, pixel_values=pixels).logits
        for policy in (default, "modality"):  # `modality` sends every image token to the vision FFN
            for evf in model.evf_layers.values():
                evf.set_allocation(policy)
            out = model(input_ids=ids, pixel_values=pixels, output_routing=True)
            assert_close(out.logits, expected)
            assert sorted(out.routing) == [0, 2]
            if policy == "modality":
                assert all(int(s.kept_image[1:].sum()) > 0 for s in out.routing.values())  # vision FFNs ran
    assert_text_path_is_base(model, base)

    train_steps(model, "vision_ffns|router")  # under `modality`: the vision FFNs surely train
    assert_text_path_is_base(model, base)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert not torch.allclose(out.logits, plain(input_ids=ids, pixel_values=pixels).logits, atol=1e-4)


def _loss_and_grads(model, ids, pixels):
    model.zero_grad()
    out = model(input_ids=ids, pixel_values=pixels, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.aux_loss.detach(), grads


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_checkpointing_same_loss_and_grads(folders, family, tower):
    model, _ = family_model(folders, family, tower)
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS.get(family, ["up_proj"]))
    stage3(model, capacity_factor=0.6)  # training capacity binds: routing must be replayed exactly
    model.train()
    ids, pixels = image_batch(model.config)
    loss, aux, grads = _loss_and_grads(model, ids, pixels)
    model.activation_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())

    # The recompute runs in backward, after the forward returned and after another forward with other inputs:
    # each layer must replay the routing inputs of its own forward.
    model.zero_grad()
    out = model(input_ids=ids, pixel_values=pixels, labels=ids)
    other_ids, other_pixels = image_batch(model.config, batch=3, text_len=4, seed=9)
    model(input_ids=other_ids, pixel_values=other_pixels, labels=other_ids)
    model(input_ids=text_batch(), labels=text_batch())
    out.loss.backward()
    grads_ckpt = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_close(out.loss.detach(), loss)
    assert_close(out.aux_loss.detach(), aux)
    assert grads.keys() == grads_ckpt.keys()
    assert any("vision_ffns" in n for n in grads) and any("router" in n for n in grads)
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], msg=name)


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_greedy_equals_no_cache_and_text_generation_is_base(folders, family, tower):
    model, base = family_model(folders, family, tower)
    stage3(model)
    ids, pixels = image_batch(model.config)
    kwargs = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**kwargs, use_cache=True), model.generate(**kwargs, use_cache=False))
    text = text_batch(1, 6)
    ours = model.generate(input_ids=text, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, base.generate(input_ids=text, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_stage3_save_load_keeps_layer_classes(tmp_path, folders, family):
    model, _ = family_model(folders, family, "siglip_full")
    stage3(model, num_experts=3)
    model.save_pretrained(tmp_path)
    loaded = EveForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert [type(a) for a in loaded.language_model.get_decoder().layers] == [
        type(b) for b in model.language_model.get_decoder().layers
    ]
    ids, pixels = image_batch(model.config)
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, pixel_values=pixels).logits,
            model(input_ids=ids, pixel_values=pixels).logits,
        )


def test_no_split_modules_name_the_layer_classes_present(folders):
    model, _ = family_model(folders, "qwen2")
    stage3(model)
    assert {"Qwen2DecoderLayer", "EvfQwen2DecoderLayer"} <= model._no_split_modules
    everywhere, _ = family_model(folders, "qwen2")
    everywhere.add_elastic_vision_ffns("all")
    assert "EvfQwen2DecoderLayer" in everywhere._no_split_modules
    assert "Qwen2DecoderLayer" not in everywhere._no_split_modules  # FSDP auto-wrap looks every name up


def test_family_without_mlp_raises_config_error_and_changes_nothing():
    opt = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    model = EveForConditionalGeneration(
        EveConfig(text_config=opt, vision_config=tiny_vision_config("dinov2"), image_token_id=VOCAB)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"OPTDecoderLayer\) has no `mlp`.*Use such a language model"):
        model.add_elastic_vision_ffns("alternate")
    assert model.config.evf is None and not model.evf_layers
    assert model.state_dict().keys() == before.keys()
