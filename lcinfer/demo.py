"""`lcinfer demo`: the default job, on CPU in well under 3 minutes.

Loads the small retrieval model shipped with lcinfer (lcinfer/assets/retrieval, trained by
configs/retrieval_model.yaml), runs a needle-in-a-haystack grid (lengths x depths) with dense
attention, prints the table (accuracy, TTFT, KV bytes) and writes the heatmap. Sparse-prefill and
KV-compression methods join the comparison as they land.
"""

from __future__ import annotations

import time
from pathlib import Path

SHIPPED = Path(__file__).parent / "assets" / "retrieval"


def shipped_model_path() -> Path:
  """The retrieval model shipped as package data (HF layout: config, safetensors, tokenizer)."""
  return SHIPPED


def run_demo(out_dir: str = "lcinfer-demo", lengths: str = "1k,2k,4k", depths: int = 5) -> int:
  import jax

  import lcinfer
  from lcinfer.eval import runner

  out = Path(out_dir).absolute()
  runner.check_output_dir(out)
  t0 = time.perf_counter()
  llm = lcinfer.load(SHIPPED, dtype="float32")
  print(f"lcinfer {lcinfer.__version__} on {jax.devices()[0].platform}: shipped retrieval model "
        f"({llm.config.num_params() / 1e6:.1f}M params) loaded in {time.perf_counter() - t0:.1f}s")
  spec = runner.EvalSpec(task="niah_single", lengths=tuple(runner.parse_lengths(lengths)),
                         depths=tuple(runner.depths_grid(depths)), methods=("dense",))
  results = runner.run_grid(llm, spec)
  paths = runner.write_results([results], out)
  print(f"\nneedle in a haystack (niah_single), {len(spec.depths)} depths per length:\n")
  print(runner.format_table(results))
  print(f"\nwrote {', '.join(p.name for p in paths)} to {out} ({time.perf_counter() - t0:.0f}s in all)")
  return 0
