"""The kernel variants of the vertical-slash probes (vs_order_probe.py, vs_one_call.py), as comma
lists: hf|tf (heads / tiles fastest), s<stages>, lazy|eager (lazy maximum), k64|k128 (block_k),
narrow (64-key steps for ranges that fit, with k128), q56 (split mode: 56-row blocks per consumer,
block_k 64)."""
from lcinfer.pallas_kernels import flash_mgpu


def knobs(variant: str) -> dict:
  """flash_mgpu._run's keyword knobs of a variant."""
  parts = variant.split(",")
  return dict(heads_fastest="tf" not in parts, lazy_max="eager" not in parts,
              stages=next((int(p[1:]) for p in parts if p.startswith("s")), 2),
              block_k=128 if "k128" in parts else 64, narrow="narrow" in parts)


def block_q(variant: str) -> int:
  return flash_mgpu.SPLIT_Q if "q56" in variant.split(",") else flash_mgpu.TILE_Q
