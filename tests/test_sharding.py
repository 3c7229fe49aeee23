"""Tensor-parallel placement on 8 simulated CPU devices gives the same logits as one device."""

import jax
import numpy as np
import pytest

import lcinfer
from helpers import tiny_config
from lcinfer.errors import ConfigError
from lcinfer.sharding import make_mesh, spec_for

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (CPU: --xla_force_host_platform_device_count=8)")


def test_spec_for_maps_logical_names_and_checks_divisibility():
  mesh = make_mesh({"data": 2, "tensor": 4})
  spec = spec_for((64, 32), ("heads", "embed"), mesh)
  assert tuple(spec) == ("tensor", None)
  assert tuple(spec_for((8, 5), ("batch", None), mesh)) == ("data", None)
  with pytest.raises(ConfigError, match="axis 'kv_heads' of size 6 is not divisible by mesh axes"):
    spec_for((6, 64), ("kv_heads", "embed"), mesh)
  with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
    make_mesh({"model": 8})
  with pytest.raises(ConfigError, match="needs 16 devices, 8 available"):
    make_mesh({"tensor": 16})


@pytest.mark.parametrize("shape", [{"tensor": 4}, {"fsdp": 2, "tensor": 2}])
def test_sharded_model_matches_single_device(shape):
  cfg = tiny_config(num_attention_heads=4, num_key_value_heads=4)
  ref = lcinfer.LLM.random(cfg, seed=3, attention="dense")
  mesh = make_mesh(shape, jax.devices()[: np.prod(list(shape.values()))])
  tp = lcinfer.LLM.random(cfg, seed=3, attention="dense", mesh=mesh)
  q = tp.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].get_value()
  assert q.sharding.spec[0] == "tensor" and len(q.sharding.device_set) == np.prod(list(shape.values()))
  ids = np.random.default_rng(0).integers(0, 128, (2, 24)).astype(np.int32)
  np.testing.assert_allclose(tp.logits(ids), ref.logits(ids), atol=2e-5)
  a = ref.generate([ids[0, :10]], max_new_tokens=6, stop=[]).tokens[0]
  b = tp.generate([ids[0, :10]], max_new_tokens=6, stop=[]).tokens[0]
  assert a.tolist() == b.tolist()
