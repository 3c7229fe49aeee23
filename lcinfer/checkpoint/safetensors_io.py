"""Reading and writing HF safetensors checkpoints without torch.

Accepts a single `model.safetensors`, a sharded set with `model.safetensors.index.json`, or any
`*.safetensors` files in the directory. Pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are
refused: unpickling executes code from the file. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lcinfer.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
SHARD_BYTES = 5 * 1024**3

HOW_TO_CONVERT_PICKLE = (
    "lcinfer reads only safetensors: unpickling a .bin/.pt file can run arbitrary code. Convert it once, in an "
    "environment you trust, with transformers: `python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('IN_DIR').save_pretrained('OUT_DIR', safe_serialization=True)\"` and point lcinfer at OUT_DIR.")


def find_safetensors(hf_dir: str | Path) -> list[Path]:
  """The safetensors files of a checkpoint directory, or a CheckpointError saying what is there instead."""
  d = Path(hf_dir)
  if not d.is_dir():
    raise CheckpointError(f"{d} is not a directory")
  index = d / INDEX_NAME
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
    files = sorted({d / f for f in weight_map.values()})
    missing = [f.name for f in files if not f.exists()]
    if missing:
      raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
    return files
  files = sorted(d.glob("*.safetensors"))
  if files:
    return files
  pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
  if pickles:
    raise CheckpointError(f"{d} holds only pickle weights ({', '.join(pickles)}). {HOW_TO_CONVERT_PICKLE}")
  raise CheckpointError(f"{d} holds no *.safetensors weights")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) for every tensor, bf16 as ml_dtypes.bfloat16; corrupt files raise CheckpointError."""
  for f in files:
    try:
      with safe_open(str(f), framework="numpy") as sf:
        for name in sf.keys():
          yield name, sf.get_tensor(name)
    except SafetensorError as e:
      raise CheckpointError(
          f"{f} is not a readable safetensors file ({e}); it may be truncated or corrupt: download or "
          f"export it again") from None


def tensor_index(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
  """name -> (file, shape, dtype) from the headers only; duplicated names are an error."""
  out: dict[str, tuple[Path, tuple[int, ...], str]] = {}
  for f in files:
    try:
      with safe_open(str(f), framework="numpy") as sf:
        for name in sf.keys():
          sl = sf.get_slice(name)
          if name in out:
            raise CheckpointError(f"tensor {name!r} appears in both {out[name][0].name} and {f.name}")
          out[name] = (f, tuple(sl.get_shape()), sl.get_dtype())
    except SafetensorError as e:
      raise CheckpointError(
          f"{f} is not a readable safetensors file ({e}); it may be truncated or corrupt: download or "
          f"export it again") from None
  return out


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: Path, max_shard_bytes: int = SHARD_BYTES) -> list[str]:
  """Write tensors as model.safetensors, or as shards plus an index past `max_shard_bytes`."""
  total = sum(a.nbytes for a in tensors.values())
  names = sorted(tensors)
  if total <= max_shard_bytes:
    save_file({n: np.ascontiguousarray(tensors[n]) for n in names}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return ["model.safetensors"]
  shards: list[list[str]] = [[]]
  size = 0
  for n in names:
    if shards[-1] and size + tensors[n].nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(n)
    size += tensors[n].nbytes
  files, weight_map = [], {}
  for i, group in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: np.ascontiguousarray(tensors[n]) for n in group}, str(out_dir / fname), metadata={"format": "pt"})
    files.append(fname)
    weight_map.update({n: fname for n in group})
  (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2, sort_keys=True))
  return files
