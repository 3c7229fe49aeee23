"""Training metrics: one record per `log_every` steps, printed and appended to a JSON-lines file.

A record holds the step, the means over the steps since the previous record of every metric the
step returns (loss, accuracy, grad_norm, ...), the learning rate of the record's step, tokens/s
over the window (all tokens of the batch, counted or not) and the wall time of the run so far
(elapsed_s, continued across resumes). On resume, records past the restored step (written by the
interrupted process after its last checkpoint) are dropped, so the file always describes the one
trajectory that led to the current state (a run that starts from step 0 starts the file afresh).
The first record's tokens/s includes compilation.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


class MetricsLog:
  """Appends records to `path` (None: keep them in memory only)."""

  def __init__(self, path: str | Path | None, resume_step: int):
    self.path = None if path is None else Path(path)
    if self.path is not None:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._truncate_after(resume_step)

  def _truncate_after(self, step: int) -> None:
    if not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a kill
        continue
      if isinstance(rec, dict) and rec.get("step", math.inf) <= step:
        kept.append(line)
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, self.path)

  def write(self, record: dict) -> None:
    if self.path is None:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()


def read_metrics(path: str | Path) -> list[dict]:
  """The records of a metrics file, in order."""
  return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def window_record(step: int, window: list[dict], *, seconds: float, tokens: int, elapsed_s: float) -> dict:
  """One record from the host metrics of the steps in `window` (the last one is `step`)."""
  rec: dict = {"step": int(step)}
  keys = list(window[-1])
  for k in [k for k in ("loss", "accuracy") if k in keys] + sorted(k for k in keys if k not in ("loss", "accuracy")):
    if k == "lr":
      rec[k] = float(window[-1][k])
    else:
      rec[k] = float(np.mean([float(m[k]) for m in window])) if len(window) > 1 else float(window[0][k])
  rec["tokens_per_s"] = tokens / seconds if seconds > 0 else float("nan")
  rec["elapsed_s"] = elapsed_s
  return rec


def format_record(rec: dict, total_steps: int) -> str:
  parts = [f"step {rec['step']}/{total_steps}"]
  first = [k for k in ("loss", "accuracy") if k in rec]
  rest = sorted(k for k in rec if k not in (*first, "step", "tokens_per_s", "elapsed_s", "weight", "lr"))
  for k in (*first, *rest, "lr"):
    if k in rec:
      parts.append(f"{k} {rec[k]:.3e}" if k == "lr" else f"{k} {rec[k]:.4f}")
  parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
  parts.append(f"{rec['elapsed_s']:.1f}s")
  return " | ".join(parts)
