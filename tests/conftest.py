import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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
