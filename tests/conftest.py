import os
from pathlib import Path

# `make test` sets JAX_PLATFORMS=cpu; on a GPU machine (`make test-gpu`) the GPU is used.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def pytest_collection_modifyitems(config, items):
  on_gpu = any(d.platform == "gpu" for d in jax.devices())
  if on_gpu:
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on the device machine)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def fixtures_dir():
  return FIXTURES
