"""EveForConditionalGeneration on tiny random configs: every LM family x tower x projector, parity with the
plain model and the base transformers LM, gradient checkpointing, KV cache, save/load, errors."""

import copy

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, image_batch, text_batch, tiny_eve_config, tiny_model
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from eve_vlm.errors import CheckpointError, ConfigError, ImageSizeError, ImageTokenMismatchError
from eve_vlm.model import EveConfig, EveForConditionalGeneration
from eve_vlm.model.decoder_layer import EvfDecoderLayer
from eve_vlm.model.modeling import label_positions
from eve_vlm.model.params import parameter_counts


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "ldp", "ldpv2"])
@pytest.mark.parametrize("tower", ["clip", "siglip", "dinov2"])
def test_forward_loss_backward_generate(family, tower, projector):
    model = tiny_model(family, tower, projector)
    model.add_elastic_vision_ffns("alternate")
    model.train()
    ids, pixels = image_batch(model.config)
    out = model(input_ids=ids, pixel_values=pixels, labels=ids)
    # Training with labels: logits at the positions whose next token is a target (not the image's).
    kept = len(label_positions(ids.masked_fill(ids == model.config.image_token_id, -100))[0])
    assert kept < ids.shape[1]
    assert out.logits.shape == (ids.shape[0], kept, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss) and out.aux_loss > 0
    assert sorted(out.routing) == [0, 2]
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and ("projector" in name or "router" in name):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in model.vision_tower.parameters())  # frozen
    model.eval()
    gen = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert gen.shape == (ids.shape[0], ids.shape[1] + 4)
    assert (gen[:, ids.shape[1] :] < model.config.text_config.vocab_size).all()


def test_image_tokens_per_projector():
    assert tiny_eve_config(projector="mlp2x_gelu").num_image_tokens == 16  # 32 px / 8 px patches = 4x4
    assert tiny_eve_config(projector="ldp").num_image_tokens == 4  # stride 2
    assert tiny_eve_config(projector="ldpv2").num_image_tokens == 4  # pooled to a 2x2 grid
    model = tiny_model(projector="ldp")
    ids, pixels = image_batch(model.config)
    assert model.get_image_features(pixels).shape == (2, 4, 32)


def test_text_only_logits_equal_base_lm(family):
    model = tiny_model(family)
    base = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    base.load_state_dict(model.language_model.state_dict())
    ids = text_batch()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, expected)
        model.add_elastic_vision_ffns("all", allocation="img_gbpr")
        for mode in (model.eval, model.train):
            mode()
            assert torch.equal(model(input_ids=ids).logits, expected)
    assert_close(model.eval()(input_ids=ids).logits, expected)


@pytest.mark.parametrize("combine", ["hard", "straight_through"])
@pytest.mark.parametrize("allocation", ["img_gbpr", "gbpr", "bpr", "rts", "position", "modality"])
def test_evf_insertion_parity_hard_combine(family, allocation, combine):
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    model.add_elastic_vision_ffns("alternate", combine=combine, allocation=allocation)
    ids, pixels = image_batch(model.config)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, output_routing=True)
        assert_close(out.logits, plain(input_ids=ids, pixel_values=pixels).logits)
        assert sum(int(s.kept_image[1:].sum()) for s in out.routing.values()) > 0  # a vision FFN ran
        texts = text_batch()
        assert torch.equal(model(input_ids=texts).logits, plain(input_ids=texts).logits)


def test_right_padding_is_not_routed_and_does_not_change_a_row():
    model = tiny_model()
    model.add_elastic_vision_ffns("alternate", allocation="gbpr", capacity_factor=1.0)
    model.train()  # the training capacity binds: padding, if routed, would take slots from real tokens
    ids, pixels = image_batch(model.config)
    pad = torch.zeros(2, 7, dtype=ids.dtype)
    padded = torch.cat([ids, pad], dim=1)
    mask = torch.cat([torch.ones_like(ids), pad], dim=1)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))
        out = model(input_ids=padded, pixel_values=pixels, attention_mask=mask)
    assert_close(out.logits[:, : ids.shape[1]], plain.logits)
    for layer, stats in out.routing.items():
        assert int(stats.routed_image.sum() + stats.routed_text.sum()) == ids.numel(), layer
        assert torch.equal(stats.kept_text, plain.routing[layer].kept_text)
    assert_close(out.aux_loss, plain.aux_loss)


def test_vision_feature_norm_standardises_each_patch_feature(tmp_path):
    plain = tiny_model()
    normed = tiny_model(vision_feature_norm=True)
    _, pixels = image_batch(plain.config)
    with torch.no_grad():
        raw, features = plain.vision_tower(pixels), normed.vision_tower(pixels)  # same seed, same tower
    assert_close(features, torch.nn.functional.layer_norm(raw, raw.shape[-1:]))
    assert_close(features.mean(-1), torch.zeros(features.shape[:2]), atol=1e-5, rtol=0)
    assert not torch.allclose(raw.std(-1), features.std(-1))
    normed.save_pretrained(tmp_path)
    loaded = EveForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.vision_feature_norm and loaded.vision_tower.feature_norm
    assert not plain.vision_tower.feature_norm


def test_several_feature_layers_are_concatenated(tmp_path):
    model = tiny_model(projector="ldp", vision_feature_layer=[0, -2])
    dv = model.config.vision_config.hidden_size
    assert model.config.vision_feature_size == 2 * dv
    assert model.projector.mlp[0].in_features == 2 * dv
    ids, pixels = image_batch(model.config)
    with torch.no_grad():
        hidden = model.vision_tower.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        prefix = hidden[0].shape[1] - model.vision_tower.num_patches
        expected = torch.cat([hidden[0][:, prefix:], hidden[-2][:, prefix:]], dim=-1)
        assert torch.equal(model.vision_tower(pixels), expected)
        logits = model(input_ids=ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    loaded = EveForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.vision_feature_layer == [0, -2]
    assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits, logits)
    for bad in ([], [0, 99], 1.5):
        with pytest.raises(ConfigError, match="vision_feature_layer"):
            tiny_eve_config(vision_feature_layer=bad)


def test_parameter_names_of_base_lm_unchanged_except_evf():
    model = tiny_model()
    before = set(model.language_model.state_dict())
    model.add_elastic_vision_ffns([1])
    after = set(model.language_model.state_dict())
    assert {k for k in before if ".layers.1.mlp." not in k} <= after
    assert any(".layers.1.mlp.language_ffn.gate_proj.weight" in k for k in after)
    assert isinstance(model.language_model.model.layers[1], EvfDecoderLayer)


def _loss_and_grads(model, ids, pixels):
    model.zero_grad()
    out = model(input_ids=ids, pixel_values=pixels, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.aux_loss.detach(), grads


@pytest.mark.parametrize("allocation", ["img_gbpr", "rts"])
def test_gradient_checkpointing_same_loss_and_grads(allocation):
    model = tiny_model()
    model.add_elastic_vision_ffns("alternate", allocation=allocation, capacity_factor=0.6)
    model.train()
    ids, pixels = image_batch(model.config)
    torch.manual_seed(1)
    loss, aux, grads = _loss_and_grads(model, ids, pixels)
    model.activation_checkpointing_enable()  # transformers' default: non-reentrant
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    torch.manual_seed(1)
    loss_ckpt, aux_ckpt, grads_ckpt = _loss_and_grads(model, ids, pixels)
    assert_close(loss_ckpt, loss)
    assert_close(aux_ckpt, aux)
    assert grads.keys() == grads_ckpt.keys()
    assert any("vision_ffns" in n for n in grads) and any("router" in n for n in grads)
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], msg=name)


def test_kv_cache_generation_equals_no_cache(family):
    model = tiny_model(family)
    model.add_elastic_vision_ffns("alternate")
    ids, pixels = image_batch(model.config)
    kwargs = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    with_cache = model.generate(**kwargs, use_cache=True)
    without = model.generate(**kwargs, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize(
    "options",
    [
        {"allocation": "img_gbpr"},
        {"allocation": "rts"},
        {"allocation": "modality"},
        {"allocation": "bpr", "num_experts": 3, "top_k": 2},
    ],
)
def test_kv_cache_decoding_of_a_mixed_batch_equals_each_request_alone(options):
    """Left-padded batch of an image request and a text-only request: KV-cache greedy decoding (the one-token
    paths) gives each row what it gets alone, and the text row what the base LM gives."""
    model = tiny_model()
    base = copy.deepcopy(model.language_model)
    model.add_elastic_vision_ffns("alternate", **options)
    torch.manual_seed(3)
    for evf in model.evf_layers.values():  # a router that splits tokens, distinct vision FFNs
        torch.nn.init.normal_(evf.router.weight, std=1.0)
        for p in evf.vision_ffns.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    ids, pixels = image_batch(model.config, batch=1)
    text = text_batch(1, 5, seed=2)
    width = ids.shape[1]
    padded_text = torch.cat([torch.zeros(1, width - 5, dtype=text.dtype), text], dim=1)
    batch = torch.cat([ids, padded_text])
    mask = torch.cat([torch.ones_like(ids), torch.arange(width).ge(width - 5).long()[None]])
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    together = model.generate(input_ids=batch, attention_mask=mask, pixel_values=pixels, **kwargs)
    assert torch.equal(
        together,
        model.generate(input_ids=batch, attention_mask=mask, pixel_values=pixels, use_cache=False, **kwargs),
    )
    alone = model.generate(input_ids=ids, pixel_values=pixels, **kwargs)
    assert torch.equal(together[0], alone[0])
    assert torch.equal(
        together[1], base.generate(input_ids=padded_text, attention_mask=mask[1:], **kwargs)[0]
    )


def test_manual_cache_decoding_needs_has_image_and_then_matches_generate():
    from transformers.cache_utils import Cache

    model = tiny_model()
    model.add_elastic_vision_ffns("alternate")
    ids, pixels = image_batch(model.config)
    expected = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
        name, cache = next((k, v) for k, v in out.items() if isinstance(v, Cache))
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        with pytest.raises(ConfigError, match="needs has_image"):  # the image request would run as text
            model(input_ids=step, **{name: cache}, use_cache=True)
        tokens = [step]
        for _ in range(2):
            out = model(input_ids=tokens[-1], **{name: cache}, has_image=torch.ones(2, dtype=torch.bool))
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat([ids, *tokens], dim=1), expected)


def test_output_carries_the_language_models_kv_cache(family):
    from transformers.cache_utils import Cache

    model = tiny_model(family)
    model.add_elastic_vision_ffns("alternate")
    ids, pixels = image_batch(model.config)
    out = model(input_ids=ids, pixel_values=pixels, use_cache=True, output_routing=True)
    caches = [value for value in out.values() if isinstance(value, Cache)]  # named by the installed version
    assert len(caches) == 1 and caches[0].get_seq_length() == ids.shape[1]
    assert out.logits.shape[:2] == ids.shape and out.routing
    assert out.to_tuple()[:3] == (out.logits, caches[0], out.aux_loss)  # no loss: cache follows logits
    assert not any(
        isinstance(v, Cache) for v in model(input_ids=ids, pixel_values=pixels, use_cache=False).values()
    )


def test_generate_text_only_equals_base_lm():
    model = tiny_model()
    base = copy.deepcopy(model.language_model)
    model.add_elastic_vision_ffns("alternate")
    ids = text_batch(1, 5)
    ours = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    theirs = base.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("evf", [False, True])
def test_save_load_round_trip(tmp_path, family, evf):
    model = tiny_model(family, projector="ldp")
    if evf:
        model.add_elastic_vision_ffns("alternate", allocation="bpr", num_experts=3)
        torch.nn.init.normal_(model.evf_layers[0].vision_ffns[0].up_proj.weight)
    model.save_pretrained(tmp_path)
    for loader in (EveForConditionalGeneration, AutoModelForImageTextToText):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is EveForConditionalGeneration
        ids, pixels = image_batch(model.config)
        with torch.no_grad():
            assert torch.equal(
                loaded(input_ids=ids, pixel_values=pixels).logits,
                model(input_ids=ids, pixel_values=pixels).logits,
            )
    assert AutoConfig.from_pretrained(tmp_path).evf == model.config.evf
    assert not any(p.requires_grad for p in loaded.vision_tower.parameters())


def test_routers_stay_fp32_when_the_model_loads_in_bf16(tmp_path):
    """`from_pretrained(dtype=bfloat16)` loads everything in bf16 but the EVF routers
    (`_keep_in_fp32_modules_strict`); a bf16 model with a residual mix runs without autocast."""
    model = tiny_model()
    model.add_elastic_vision_ffns("alternate", use_residual=True)
    model.save_pretrained(tmp_path)
    loaded = EveForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    routers = {name for name in dtypes if name.endswith(".mlp.router.weight")}
    assert len(routers) == 2 and {dtypes[name] for name in routers} == {torch.float32}
    assert {dtype for name, dtype in dtypes.items() if name not in routers} == {torch.bfloat16}
    ids, pixels = image_batch(model.config)
    with torch.no_grad():
        logits = loaded(input_ids=ids, pixel_values=pixels.to(torch.bfloat16)).logits
    assert logits.dtype == torch.bfloat16 and bool(logits.isfinite().all())


def test_device_map_auto_loads_and_no_decoder_or_tower_layer_is_split(tmp_path):
    """`_no_split_modules` names the converted layer class, the family's own (layers left plain) and the
    tower's layer class; `from_pretrained(device_map="auto")` loads (here all on the CPU) the same model."""
    model = tiny_model()
    model.add_elastic_vision_ffns("alternate")
    model.save_pretrained(tmp_path)
    loaded = EveForConditionalGeneration.from_pretrained(tmp_path, device_map="auto").eval()
    assert {"EvfLlamaDecoderLayer", "LlamaDecoderLayer", "Dinov2Layer"} <= set(loaded._no_split_modules)
    ids, pixels = image_batch(model.config)
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, pixel_values=pixels).logits,
            model.eval()(input_ids=ids, pixel_values=pixels).logits,
        )
    generated = loaded.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    expected = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, expected)


def test_a_router_offloaded_by_a_device_map_is_run_through_its_module(tmp_path):
    """With a device map that offloads one router to disk, accelerate's hook on the router module brings its
    weight in for the call; reading `router.weight` directly would use an empty placeholder."""
    model = tiny_model()
    model.add_elastic_vision_ffns("alternate")
    model.save_pretrained(tmp_path)
    layer0 = "language_model.model.layers.0."
    device_map = {
        name: "cpu"
        for name in ["vision_tower", "projector", "language_model.lm_head"]
        + [f"language_model.model.{n}" for n in ("embed_tokens", "norm", "rotary_emb")]
        + [f"language_model.model.layers.{i}" for i in (1, 2, 3)]
        + [layer0 + n for n in ("self_attn", "input_layernorm", "post_attention_layernorm")]
        + [layer0 + n for n in ("mlp.language_ffn", "mlp.vision_ffns")]
    }
    device_map[layer0 + "mlp.router"] = "disk"
    loaded = EveForConditionalGeneration.from_pretrained(
        tmp_path, device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    ids, pixels = image_batch(model.config)
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, pixel_values=pixels).logits,
            model.eval()(input_ids=ids, pixel_values=pixels).logits,
        )


@pytest.mark.parametrize("name", ["eager", "flex_attention"])
def test_attn_implementation_reaches_the_language_model_and_the_tower(tmp_path, name):
    tiny_model().save_pretrained(tmp_path)
    loaded = EveForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=name)
    assert loaded.language_model.config._attn_implementation == name
    assert loaded.vision_tower.tower.config._attn_implementation == name


def test_checkpoint_mismatch_raises(tmp_path):
    plain = tiny_model()
    plain.save_pretrained(tmp_path / "plain")
    config = EveConfig.from_pretrained(tmp_path / "plain")
    config.evf = {"layers": [0]}
    config.save_pretrained(tmp_path / "plain")  # config now expects EVF weights that the file lacks
    with pytest.raises(CheckpointError, match="missing"):
        EveForConditionalGeneration.from_pretrained(tmp_path / "plain")

    evf = tiny_model()
    evf.add_elastic_vision_ffns([0])
    evf.save_pretrained(tmp_path / "evf")
    config = EveConfig.from_pretrained(tmp_path / "evf")
    config.evf = None
    config.save_pretrained(tmp_path / "evf")  # weights have EVF keys the config does not know
    with pytest.raises(CheckpointError, match="unexpected"):
        EveForConditionalGeneration.from_pretrained(tmp_path / "evf")


def test_parameter_counts():
    model = tiny_model()
    plain = parameter_counts(model)
    assert plain.active_text_token == plain.language_model
    model.add_elastic_vision_ffns("alternate")
    counts = parameter_counts(model)
    ffn = sum(p.numel() for p in model.evf_layers[0].language_ffn.parameters())
    assert counts.vision_ffns == 2 * ffn
    assert counts.routers == 2 * 2 * 32
    assert counts.total == plain.total + counts.vision_ffns + counts.routers
    assert counts.active_text_token == plain.active_text_token
    assert (
        counts.active_image_token
        == counts.vision_tower + counts.projector + plain.language_model + counts.routers
    )
    assert counts.trainable == counts.total - counts.vision_tower - 2 * ffn


def test_parameter_counts_give_the_vocabulary_mixtures_scale_to_the_image_path():
    plain = parameter_counts(tiny_model(projector="ldp"))
    mixed = parameter_counts(tiny_model(projector="ldp", vocabulary_mixture=True))
    assert mixed.total == plain.total + 1
    assert mixed.projector == plain.projector + 1
    assert mixed.active_image_token == plain.active_image_token + 1
    assert mixed.active_text_token == plain.active_text_token


# --- errors ---------------------------------------------------------------------------------------------------
def test_image_count_mismatch_raises():
    model = tiny_model()
    ids, pixels = image_batch(model.config, images_per_row=1)
    with pytest.raises(ImageTokenMismatchError, match="3 image"):
        model(input_ids=ids, pixel_values=torch.cat([pixels, pixels[:1]]))
    with pytest.raises(ImageTokenMismatchError, match="no pixel_values"):
        model(input_ids=ids)


def test_wrong_image_size_raises():
    model = tiny_model()
    ids, _ = image_batch(model.config)
    with pytest.raises(ImageSizeError, match=r"image_size=32"):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 48, 48))


def test_unknown_names_and_bad_indices_raise():
    with pytest.raises(ConfigError, match="projector_type='mlp3x'"):
        tiny_eve_config(projector="mlp3x")
    model = tiny_model()
    with pytest.raises(ConfigError, match="'gpbr' is unknown"):
        model.add_elastic_vision_ffns("alternate", allocation="gpbr")
    with pytest.raises(ConfigError, match=r"\[4, 9\] out of range.*4 decoder layers"):
        model.add_elastic_vision_ffns([0, 4, 9])
    with pytest.raises(ConfigError, match="placement 'odd'"):
        model.add_elastic_vision_ffns("odd")
    with pytest.raises(ConfigError, match="Unknown EVF option"):
        model.add_elastic_vision_ffns("alternate", capacity=3)
    with pytest.raises(ConfigError, match="smaller than the vision tower's patch_size=8"):
        tiny_eve_config(image_size=4)
    assert tiny_eve_config(image_size=30).patch_grid == 3  # as the tower's strided patch convolution: 30 // 8
    model.add_elastic_vision_ffns([1])
    with pytest.raises(ConfigError, match="already"):
        model.add_elastic_vision_ffns([2])


def test_placeholder_id_outside_vocab_is_never_embedded():
    model = tiny_model()
    assert model.config.image_token_id == IMAGE_TOKEN_ID == model.get_input_embeddings().num_embeddings
    ids, pixels = image_batch(model.config)
    labels = ids.clone()
    out = model(
        input_ids=ids, pixel_values=pixels, labels=labels
    )  # placeholder labels are ignored, not indexed
    assert torch.isfinite(out.loss)
