"""Recipe: the small long-context retrieval model that ships with lcinfer (issue 3).

A Llama-family model of a few million parameters, a sentencepiece tokenizer trained on
`lcinfer.eval.training_corpus`, and training on a mixture of the synthetic tasks of
`lcinfer.eval` (NIAH variants, variable tracking, kv retrieval, word extraction) at mixed lengths.
Each sample is BOS + context + question + target + EOS; the loss weighs the target and EOS tokens 1
and every other token `lm_weight` (a little language modelling grows the induction heads that
retrieval needs; Olsson et al. 2022). Questions end with a RULER-style answer prefix that restates
the query ("Answer: The special magic number for K is"), so the answer is a copy of what follows
the same words in the context.

Rows of one fixed length hold samples of log-uniform lengths packed end to end (one compile;
cuDNN's causal flash attention in training). Batches are a pure function of (seed, step)
(lcinfer.train.data), which makes resumption exact and lets worker processes prefetch them.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np

from lcinfer.errors import ConfigError

DEFAULT_TASKS = {"niah_single": 0.3, "niah_multikey": 0.15, "niah_multivalue": 0.1, "niah_multiquery": 0.1,
                 "vt": 0.15, "kv_uuid": 0.1, "cwe": 0.05, "fwe": 0.05}

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                 "{{ raise_exception('roles are system, user and assistant') }}{% endif %}{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


def train_tokenizer(out_dir: str | Path, vocab_size: int = 1024, corpus_chars: int = 3_000_000, seed: int = 0) -> Path:
  """A sentencepiece BPE tokenizer (digits split, byte fallback, newlines kept) for the tasks.
  Deterministic: the same arguments give a byte-identical tokenizer.model."""
  import io

  import sentencepiece as spm

  from lcinfer.eval import training_corpus

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  lines = training_corpus(corpus_chars, seed=seed).splitlines()
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
      user_defined_symbols=["\n"], num_threads=1, minloglevel=2)
  (out / "tokenizer.model").write_bytes(model.getvalue())
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
       "add_eos_token": False, "chat_template": CHAT_TEMPLATE}, indent=2))
  return out


@dataclasses.dataclass(frozen=True)
class TaskMixtureSource:
  """Batches [rows, seq_len] of task samples packed end to end (no document mask: earlier samples
  act as extra haystack, with their needles as distractors), positions running 0..seq_len-1.

  Sample lengths (prompt tokens) are log-uniform in [min_len, max_len], so one fixed shape covers
  short and long contexts alike; a row's tail too short for another sample is padding.
  """

  tokenizer_dir: str
  rows: int = 4
  seq_len: int = 16384
  min_len: int = 256
  max_len: int | None = None
  lm_weight: float = 0.0  # loss weight of the non-answer tokens (language modelling); answers weigh 1
  tasks: tuple[tuple[str, float], ...] = tuple(DEFAULT_TASKS.items())
  seed: int = 0

  def __post_init__(self):
    from lcinfer.eval import available_tasks

    bad = [t for t, _ in self.tasks if t not in available_tasks()]
    if bad:
      raise ConfigError(f"unknown task(s) {bad}; available: {', '.join(available_tasks())}")
    if not 128 <= self.min_len <= self.seq_len:
      raise ConfigError(f"min_len must be in [128, seq_len], got {self.min_len}")

  def _tok(self):
    from lcinfer.checkpoint.tokenizer import Tokenizer

    cache = self.__dict__.get("_tokenizer")
    if cache is None:
      cache = Tokenizer.from_dir(self.tokenizer_dir)
      object.__setattr__(self, "_tokenizer", cache)
    return cache

  def sample_tokens(self, rng: random.Random, max_tokens: int) -> tuple[list[int], int]:
    """(tokens, number of answer tokens at the end) of one sample of at most `max_tokens` tokens."""
    from lcinfer.eval import make_sample, token_counter

    tok = self._tok()
    names, weights = zip(*self.tasks)
    task = rng.choices(names, weights=weights)[0]
    hi = min(max_tokens, self.max_len or self.seq_len) - 72  # room for BOS, the answer and EOS
    length = int(round(np.exp(rng.uniform(np.log(self.min_len), np.log(max(hi, self.min_len))))))
    s = make_sample(task, min(length, hi), depth=rng.random(), seed=rng.getrandbits(48),
                    count_tokens=token_counter(tok))
    prompt = tok.encode(s.prompt)
    target = tok.encode(s.target, add_special_tokens=False) + [tok.eos_token_id]
    ids = (prompt + target)[:max_tokens]
    return ids, max(0, min(len(target), len(ids) - len(prompt)))

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = random.Random(f"{self.seed}/{step}")
    tokens = np.zeros((self.rows, self.seq_len), np.int32)
    mask = np.zeros((self.rows, self.seq_len), np.float32)
    positions = np.full((self.rows, self.seq_len), -1, np.int32)
    for r in range(self.rows):
      at = 0
      while self.seq_len - at >= self.min_len + 72:
        ids, n_ans = self.sample_tokens(rng, self.seq_len - at)
        n = len(ids)
        tokens[r, at:at + n] = ids
        mask[r, at + 1:at + n - n_ans] = self.lm_weight
        mask[r, at + n - n_ans:at + n] = 1.0
        at += n
      positions[r, :at] = np.arange(at)
    return {"tokens": tokens, "loss_mask": mask, "positions": positions}

  def describe(self) -> dict:
    return {"kind": "TaskMixtureSource", "rows": self.rows, "seq_len": self.seq_len, "min_len": self.min_len,
            "max_len": self.max_len, "lm_weight": self.lm_weight, "tasks": [list(t) for t in self.tasks], "seed": self.seed}


def model_config_dict(vocab_size: int, hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                      head_dim: int = 64, intermediate: int = 768, max_positions: int = 32768,
                      rope_theta: float = 100000.0) -> dict:
  """The HF config.json of the retrieval model."""
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
          "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
          "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
          "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5, "rope_theta": rope_theta,
          "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
          "torch_dtype": "float32"}


class PrefetchedSource:
  """Wraps a DataSource: batch(step) also queues the next `depth` steps on a process pool, so the
  trainer (which asks for steps in order) finds them ready. Same batches, computed ahead."""

  def __init__(self, source, workers: int = 8, depth: int | None = None):
    self.source, self.workers, self.depth = source, workers, depth or 2 * workers
    self._pool, self._futures = None, {}

  def describe(self) -> dict:
    return self.source.describe() if hasattr(self.source, "describe") else {}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    if self.workers <= 1:
      return self.source.batch(step)
    if self._pool is None:
      import concurrent.futures as cf
      import multiprocessing as mp

      self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
    for s in range(step, step + self.depth + 1):
      if s not in self._futures:
        self._futures[s] = self._pool.submit(self.source.batch, s)
    for s in [s for s in self._futures if s < step]:
      self._futures.pop(s).cancel()
    return self._futures.pop(step).result()

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(cancel_futures=True)
      self._pool = None


def mixed_precision_loss(compute_dtype, attention):
  """next_token_loss with float32 master weights cast to `compute_dtype` for the forward pass."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lcinfer.train.loss import next_token_loss

  dt = jnp.dtype(compute_dtype)

  def loss_fn(model, batch, rng=None):
    g, st = nnx.split(model)
    st = jax.tree.map(lambda x: x.astype(dt) if x.dtype == jnp.float32 else x, st)
    return next_token_loss(nnx.merge(g, st), batch, rng, attention=attention)

  return loss_fn


def run_recipe(config_path: str | Path, out_dir: str | Path, *, total_steps: int | None = None,
               workers: int | None = None, progress: bool = True, time_budget_s: float | None = None,
               init_from: str | Path | None = None, overrides: dict | None = None) -> Path:
  """Tokenizer + model + training + export: returns the HF-format model directory (out/model).

  time_budget_s: stop early (after saving) once training has run this long; the model is exported.
  init_from: start from these weights (an HF/lcinfer checkpoint of the same config) instead of random.
  overrides: {"train": {...}, "data": {...}} merged over the YAML sections.
  """
  import shutil
  import time

  import jax
  import yaml

  import lcinfer
  from lcinfer import attention as attn_lib
  from lcinfer.checkpoint import params as P
  from lcinfer.checkpoint.safetensors_io import write_safetensors
  from lcinfer.train import TrainConfig, train

  cfg = yaml.safe_load(Path(config_path).read_text())
  for section, values in (overrides or {}).items():
    cfg[section].update(values)
  out = Path(out_dir)
  model_dir = out / "model"
  if not (model_dir / "tokenizer.model").exists():
    train_tokenizer(model_dir, **cfg["tokenizer"])
  tok_dir = str(model_dir)
  from lcinfer.checkpoint.tokenizer import Tokenizer

  vocab = Tokenizer.from_dir(tok_dir).vocab_size
  hf_cfg = model_config_dict(vocab, **cfg["model"])
  config = lcinfer.ModelConfig.from_hf(hf_cfg)
  d = dict(cfg["data"])
  d["tasks"] = tuple((k, float(v)) for k, v in d.pop("tasks").items())
  source = TaskMixtureSource(tok_dir, **d)
  tc = dict(cfg["train"])
  if total_steps is not None:
    tc["total_steps"] = total_steps
    tc["warmup_steps"] = min(tc.get("warmup_steps", 0), total_steps)
    tc["save_every"] = min(tc.get("save_every", total_steps), total_steps)
  tconf = TrainConfig(batch_size=source.rows, seq_len=source.seq_len, checkpoint_dir=str(out / "ckpt"),
                      metrics_path=str(out / "metrics.jsonl"), dtype="float32", **tc)
  if init_from is not None:
    model = lcinfer.load(init_from, dtype="float32")
    if dataclasses.replace(model.config, dtype=config.dtype) != config:  # a bf16 export may init an f32 run
      raise ConfigError(f"--init {init_from} has another model config than {config_path}")
  else:
    model = lcinfer.LLM.random(config, dtype="float32", seed=tconf.seed)
  att = attn_lib.resolve("auto", config, None, "prefill")
  loss_fn = mixed_precision_loss(cfg.get("compute_dtype", "float32"), att)
  data = PrefetchedSource(source, workers=workers if workers is not None else cfg.get("workers", 8))
  print(f"retrieval model: {config.num_params() / 1e6:.2f}M params, vocab {vocab}, attention {att.name}, "
        f"device {jax.devices()[0].device_kind}", flush=True)
  t0 = time.monotonic()

  def out_of_time(trainer, step):
    return time_budget_s is not None and time.monotonic() - t0 > time_budget_s

  try:
    result = train(tconf, (model.graphdef, model.params), data, loss_fn=loss_fn, progress=progress,
                   on_step=out_of_time)
  finally:
    data.close()
  write_safetensors(P.state_to_arrays(result.params), model_dir)
  (model_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  shutil.copy(Path(config_path), model_dir / "recipe.yaml")
  return model_dir


def main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(description="Train the small retrieval model (configs/retrieval_model.yaml).")
  p.add_argument("config")
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=None, help="override train.total_steps")
  p.add_argument("--workers", type=int, default=None)
  p.add_argument("--time-budget-s", type=float, default=None, help="stop early and export after this long")
  p.add_argument("--init", default=None, help="start from these weights (same config)")
  p.add_argument("--lr", type=float, default=None, help="override train.learning_rate")
  p.add_argument("--data-seed", type=int, default=None, help="override data.seed")
  a = p.parse_args(argv)
  over = {"train": {}, "data": {}}
  if a.lr is not None:
    over["train"]["learning_rate"] = a.lr
  if a.data_seed is not None:
    over["data"]["seed"] = a.data_seed
  print(run_recipe(a.config, a.out, total_steps=a.steps, workers=a.workers, time_budget_s=a.time_budget_s,
                   init_from=a.init, overrides=over))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
