import json

import pytest

from conftest import FIXTURES
from lcinfer import ModelConfig
from lcinfer.errors import ConfigError
from helpers import TINY


def test_families_and_features_from_hf():
  c = ModelConfig.from_hf({**TINY, "model_type": "qwen2", "num_key_value_heads": 1})
  assert c.qkv_bias and not c.o_bias and c.layer_windows == (None, None)
  c = ModelConfig.from_hf({**TINY, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
                           "max_window_layers": 1})
  assert c.layer_windows == (None, 8)
  c = ModelConfig.from_hf({**TINY, "model_type": "mistral", "sliding_window": 16, "head_dim": 32})
  assert c.layer_windows == (16, 16) and c.head_dim == 32
  c = ModelConfig.from_hf({**TINY, "model_type": "phi3", "partial_rotary_factor": 0.5})
  assert c.fused_qkv and c.fused_gate_up and c.rotary_dim == 8
  c = ModelConfig.from_hf({**TINY, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True})
  assert c.qkv_bias and c.o_bias and c.mlp_bias and c.tie_word_embeddings
  assert ModelConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("case", ["llama_llama3_gqa", "llama_tied_linear", "mistral_sliding", "qwen2_mqa_bias",
                                  "phi3_longrope", "llama_yarn", "llama_dynamic"])
def test_v4_and_v5_config_formats_agree(case):
  v5 = ModelConfig.from_hf(FIXTURES / case / "config.json")
  v4 = ModelConfig.from_hf(json.loads((FIXTURES / case / "config_v4.json").read_text()))
  assert v5 == v4
  assert v5.rope.rope_type == {"llama_llama3_gqa": "llama3", "llama_tied_linear": "linear", "llama_yarn": "yarn",
                               "llama_dynamic": "dynamic", "phi3_longrope": "longrope"}.get(case, "default")


@pytest.mark.parametrize("override,field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "swish2"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "magic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                       "original_max_position_embeddings": 16}}, "rope_scaling.short_factor"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
])
def test_bad_configs_name_the_field(override, field):
  with pytest.raises(ConfigError, match=f"'{field}'"):
    ModelConfig.from_hf({**TINY, **override})


def test_unknown_model_type_lists_supported():
  with pytest.raises(ConfigError, match="supported: llama, mistral, phi3, qwen2"):
    ModelConfig.from_hf({**TINY, "model_type": "bert"})


def test_missing_required_field():
  d = dict(TINY)
  del d["hidden_size"]
  with pytest.raises(ConfigError, match="'hidden_size': missing"):
    ModelConfig.from_hf(d)
