"""`lcinfer eval`: run a task over a (length x depth) grid for one or more attention methods.

For every cell and sample: build the prompt at the target length in the model's own tokens,
prefill + greedy decode through the engine (TTFT = time to the first new token, from the first
streamed chunk), score the output with the task's string match, and record KV bytes and peak
memory. Results go to `results-<tasks>.json` (every cell), `summary-<tasks>.md` (one comparison
table) and one heatmap PNG per task and method (so several runs can share an output directory), written into a temporary directory and moved into place at the
end, so an interrupted or failed run leaves no partial result files.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from lcinfer import attention as attn_lib
from lcinfer.errors import CapacityError, ConfigError
from lcinfer.eval.base import get_task, make_sample, score
from lcinfer.eval.haystack import token_counter

KV_PRESSES = ("none",)  # KV-compression presses register here as they land
ANSWER_TOKENS = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48, "niah_multiquery": 32,
                 "vt": 40, "cwe": 48, "fwe": 24, "kv_uuid": 64}


def parse_lengths(s: str) -> list[int]:
  """'1k,2k,4096' -> [1024, 2048, 4096]."""
  out = []
  for part in filter(None, (p.strip().lower() for p in s.split(","))):
    mult = 1024 if part.endswith("k") else 1
    try:
      out.append(int(float(part[:-1] if part.endswith("k") else part) * mult))
    except ValueError:
      raise ConfigError(f"--lengths: cannot read {part!r}; use e.g. 1k,2k,4096") from None
  if not out or min(out) < 16:
    raise ConfigError(f"--lengths must name lengths of at least 16 tokens, got {s!r}")
  return out


def depths_grid(n: int) -> list[float]:
  if n < 1:
    raise ConfigError(f"--depths must be >= 1, got {n}")
  return [0.5] if n == 1 else [round(float(x), 4) for x in np.linspace(0.0, 1.0, n)]


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  task: str
  lengths: tuple[int, ...]
  depths: tuple[float, ...]
  methods: tuple[str, ...] = ("auto",)
  kv_press: str = "none"
  samples: int = 1
  seed: int = 0
  max_new_tokens: int | None = None

  def __post_init__(self):
    spec = get_task(self.task)  # unknown task: ConfigError listing the valid ones
    if self.kv_press not in KV_PRESSES:
      raise ConfigError(f"unknown kv press {self.kv_press!r}; available: {', '.join(KV_PRESSES)}")
    for m in self.methods:
      if m != "auto":
        attn_lib.get(m)  # unknown method: ConfigError listing the valid ones
    if self.samples < 1:
      raise ConfigError(f"--samples must be >= 1, got {self.samples}")
    if not spec.uses_depth:
      object.__setattr__(self, "depths", (None,))


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: process peak RSS


def check_output_dir(out: Path) -> None:
  """Fail before any work if `out` cannot be created or written."""
  try:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
      pass
  except OSError as e:
    raise ConfigError(f"output directory {out} is not writable: {e.strerror}; choose another --out") from None


def run_grid(llm, spec: EvalSpec, progress: bool = True) -> dict:
  """Run every (method, length, depth, sample) of `spec` on `llm`; returns the results dict."""
  if llm.tokenizer is None:
    raise ConfigError("evaluation needs a model with tokenizer files (tokenizer.json or tokenizer.model)")
  count = token_counter(llm.tokenizer)
  max_new = spec.max_new_tokens or ANSWER_TOKENS.get(spec.task, 32)
  limit = llm.config.max_position_embeddings
  too_long = [n for n in spec.lengths if n + max_new + 1 > limit]
  if too_long:
    raise CapacityError(f"length(s) {too_long} + {max_new} new tokens exceed the model's capacity "
                        f"({limit} positions, max_position_embeddings); use shorter --lengths")
  from lcinfer.api import LLM

  cells = []
  grid = [(m, n, d, s) for m in spec.methods for n in spec.lengths for d in spec.depths for s in range(spec.samples)]
  # every (length, depth, sample) cell gets its own needle; methods see the same samples
  cell_seed = {(n, d, s): spec.seed * 1_000_003 + i for i, (n, d, s) in enumerate(
      (n, d, s) for n in spec.lengths for d in spec.depths for s in range(spec.samples))}
  bar = tqdm(grid, desc=f"eval {spec.task}", unit="sample", disable=not progress)
  per_method = {}
  for method, n, d, s in bar:
    if method not in per_method:
      per_method[method] = LLM(llm.config, llm.graphdef, llm.params, tokenizer=llm.tokenizer, mesh=llm.mesh,
                               attention=method, stop_ids=llm.stop_ids, dtype=llm.dtype.name)
    m = per_method[method]
    sample = make_sample(spec.task, n, depth=d, seed=cell_seed[(n, d, s)], count_tokens=count)
    ids = np.asarray(m.tokenizer.encode(sample.prompt), np.int32)
    t0 = time.perf_counter()
    ttft, new = None, []
    for piece in m.stream([ids], max_new_tokens=max_new, every=max_new):
      if ttft is None:
        ttft = time.perf_counter() - t0
      new.extend(int(t) for t in piece[0] if t >= 0)
    text = m.tokenizer.decode(new)
    acc = score(sample, text)
    cells.append({"method": method, "prefill": m.prefill_attention.name, "decode": m.decode_attention.name,
                  "length": n, "depth": d, "sample": s, "prompt_tokens": int(ids.size), "accuracy": acc,
                  "ttft_s": ttft, "kv_bytes": int(m.config.kv_bytes_per_token(m.dtype.itemsize) * ids.size),
                  "peak_bytes": _peak_bytes(), "answers": list(sample.answers), "output": text})
    bar.set_postfix(method=method, length=n, acc=f"{acc:.2f}")
  return {"task": spec.task, "spec": dataclasses.asdict(spec), "device": jax.devices()[0].device_kind,
          "cells": cells}


def _table(results: dict) -> tuple[list[str], list[list[str]]]:
  spec = results["spec"]
  header = ["method"] + [f"{n}" for n in spec["lengths"]] + ["mean acc", "mean TTFT s", "KV MB @ max"]
  rows = []
  for method in spec["methods"]:
    cs = [c for c in results["cells"] if c["method"] == method]
    accs = [np.mean([c["accuracy"] for c in cs if c["length"] == n]) for n in spec["lengths"]]
    kv = max(c["kv_bytes"] for c in cs) / 2**20
    rows.append([method] + [f"{a:.2f}" for a in accs] + [f"{np.mean(accs):.3f}",
                                                         f"{np.mean([c['ttft_s'] for c in cs]):.3f}", f"{kv:.1f}"])
  return header, rows


def format_table(results: dict) -> str:
  header, rows = _table(results)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def heatmap(results: dict, method: str, path: Path) -> None:
  """The usual NIAH picture: depth (rows) x length (columns), accuracy colour-coded."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  spec = results["spec"]
  lengths, depths = spec["lengths"], spec["depths"]
  grid = np.zeros((len(depths), len(lengths)))
  for i, d in enumerate(depths):
    for j, n in enumerate(lengths):
      grid[i, j] = np.mean([c["accuracy"] for c in results["cells"]
                            if c["method"] == method and c["length"] == n and c["depth"] == d])
  fig, ax = plt.subplots(figsize=(max(3.2, 1.1 + 0.9 * len(lengths)), 1.2 + 0.45 * len(depths)))  # title fits
  im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
  ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), ["-" if d is None else f"{d:.0%}" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  for i in range(len(depths)):
    for j in range(len(lengths)):
      ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
  ax.set_title(f"{results['task']} | {method} | mean {grid.mean():.3f}")
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_results(results_list: Sequence[dict], out: Path) -> list[Path]:
  """results-<tasks>.json, summary-<tasks>.md and heatmaps, moved into `out` once all are written."""
  check_output_dir(out)
  tmp = Path(tempfile.mkdtemp(prefix=".eval-partial-", dir=out))
  try:
    tag = "+".join(r["task"] for r in results_list)
    names = [f"results-{tag}.json"]
    (tmp / names[0]).write_text(json.dumps(list(results_list), indent=1))
    md = []
    for r in results_list:
      md.append(f"## {r['task']} ({r['device']})\n\n{format_table(r)}\n")
      for method in r["spec"]["methods"]:
        name = f"heatmap-{r['task']}-{method}.png"
        heatmap(r, method, tmp / name)
        names.append(name)
    (tmp / f"summary-{tag}.md").write_text("\n".join(md))
    names.append(f"summary-{tag}.md")
    for name in names:
      (tmp / name).replace(out / name)
    return [out / n for n in names]
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
