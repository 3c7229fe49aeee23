"""`lcinfer convert HF_DIR OUT_DIR` and `lcinfer export OUT_DIR HF_DIR`.

A converted checkpoint is a directory:
    lcinfer.json                  format marker, dtype, model_type
    config.json                   the HF config, verbatim
    params/                       orbax (tensorstore/OCDBT) checkpoint of {HF tensor name: array}
    tokenizer files, generation_config.json, chat template files: copied verbatim
Both commands validate everything first, write into a temporary sibling directory, and rename it
into place only when complete: a failure leaves no partial output, and an existing output is
replaced only with `force`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from lcinfer.checkpoint import params as P
from lcinfer.checkpoint import safetensors_io as st
from lcinfer.config import ModelConfig
from lcinfer.errors import CheckpointError, ConfigError, OutputExistsError

FORMAT = "lcinfer-checkpoint"
FORMAT_VERSION = 1
SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja", "chat_template.json", "added_tokens.json",
              "vocab.json", "merges.txt")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, force: bool = False):
  """Yield a temporary directory that becomes `out_dir` only if the block completes."""
  out = Path(out_dir).absolute()
  if out.exists() and not force:
    raise OutputExistsError(f"output directory {out} already exists; pass --force (force=True) to replace it")
  parent = out.parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
  except OSError as e:
    raise CheckpointError(f"cannot write to {parent}: {e.strerror}") from None
  try:
    yield tmp
    if out.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
      os.replace(out, old / out.name)
      os.replace(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _copy_side_files(src: Path, dst: Path) -> None:
  for name in SIDE_FILES:
    if (src / name).exists():
      shutil.copy2(src / name, dst / name)


def is_converted(path: str | Path) -> bool:
  return (Path(path) / "lcinfer.json").exists()


def read_marker(path: str | Path) -> dict:
  p = Path(path) / "lcinfer.json"
  try:
    marker = json.loads(p.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{p} is unreadable ({e}); the checkpoint directory is corrupt: convert again") from None
  if marker.get("format") != FORMAT:
    raise CheckpointError(f"{p} is not an lcinfer checkpoint marker")
  if marker.get("version", 0) > FORMAT_VERSION:
    raise CheckpointError(f"{path} was written by a newer lcinfer (format {marker['version']}); upgrade lcinfer")
  return marker


def convert(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None, force: bool = False) -> Path:
  """HF safetensors directory -> lcinfer checkpoint. dtype None keeps the checkpoint's own dtype."""
  import orbax.checkpoint as ocp

  src = Path(hf_dir)
  if not (src / "config.json").exists():
    raise CheckpointError(f"{src} has no config.json; is it a Hugging Face model directory?")
  config = ModelConfig.from_hf(src)
  if dtype is not None:
    P.parse_dtype(dtype)
  out = Path(out_dir).absolute()
  if out.exists() and not force:  # fail before reading gigabytes
    raise OutputExistsError(f"output directory {out} already exists; pass --force (force=True) to replace it")
  arrays = P.read_hf_arrays(src, config)
  dtypes = {str(a.dtype) for a in arrays.values()}
  if dtype is None:
    if len(dtypes) != 1:
      raise ConfigError(f"the checkpoint mixes dtypes {sorted(dtypes)}; choose one with --dtype")
    dtype = P.dtype_name(next(iter(arrays.values())).dtype)
  np_dtype = P.parse_dtype(dtype)
  arrays = {n: (a if a.dtype == np_dtype else a.astype(np_dtype)) for n, a in arrays.items()}
  with atomic_output_dir(out, force) as tmp:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", arrays)
    ckptr.wait_until_finished()
    ckptr.close()
    shutil.copy2(src / "config.json", tmp / "config.json")
    _copy_side_files(src, tmp)
    marker = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype, "model_type": config.model_type,
              "num_params": int(sum(a.size for a in arrays.values())), "source": str(src.absolute())}
    (tmp / "lcinfer.json").write_text(json.dumps(marker, indent=2))
  return out


def restore_arrays(ckpt_dir: str | Path, config: ModelConfig, dtype, mesh=None) -> dict:
  """{name: jax.Array} from a converted checkpoint, placed directly with the mesh's shardings."""
  import orbax.checkpoint as ocp

  params_dir = Path(ckpt_dir).absolute() / "params"
  if not params_dir.is_dir():
    raise CheckpointError(f"{ckpt_dir} has no params/ directory; the checkpoint is incomplete: convert again")
  target = P.abstract_arrays(config, dtype, mesh)
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(params_dir)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    stored = {k: tuple(v.shape) for k, v in dict(tree).items()}
    problems = P.check_tensors({k: (params_dir, s, "F32") for k, s in stored.items()},
                               {k: tuple(v.shape) for k, v in target.items()}, config)
    if problems:
      raise CheckpointError(f"{ckpt_dir} does not match its config.json:\n  " + "\n  ".join(problems))
    return ckptr.restore(params_dir, target)
  except CheckpointError:
    raise
  except Exception as e:  # orbax/tensorstore raise many kinds; all mean the same to a user
    raise CheckpointError(f"cannot restore {params_dir}: {type(e).__name__}: {str(e)[:300]}; "
                          f"the checkpoint is corrupt or incomplete: convert again") from None
  finally:
    ckptr.close()


def export(ckpt_dir: str | Path, hf_dir: str | Path, force: bool = False) -> Path:
  """lcinfer checkpoint -> HF safetensors directory (bit-exact at the stored dtype)."""
  src = Path(ckpt_dir)
  marker = read_marker(src)
  config = ModelConfig.from_hf(src)
  out = Path(hf_dir).absolute()
  if out.exists() and not force:
    raise OutputExistsError(f"output directory {out} already exists; pass --force (force=True) to replace it")
  arrays = restore_arrays(src, config, P.parse_dtype(marker["dtype"]))
  host = {n: np.asarray(a) for n, a in arrays.items()}
  with atomic_output_dir(out, force) as tmp:
    st.write_safetensors(host, tmp)
    shutil.copy2(src / "config.json", tmp / "config.json")
    _copy_side_files(src, tmp)
  return out
