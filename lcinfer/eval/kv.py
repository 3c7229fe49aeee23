"""Key-value retrieval over a JSON object of UUIDs (Liu et al. 2023, "Lost in the Middle"; RULER's
UUID multi-key NIAH; SCBench's Retr.KV).

A key-value pair is tens of tokens, coarser than the length tolerance; the remainder is filled
with a few prose sentences before the JSON (`fit_padded`), so lengths are as exact as for NIAH.
"""

from __future__ import annotations

import random
from typing import Callable

from lcinfer.eval import words
from lcinfer.eval.base import Sample, register
from lcinfer.eval.haystack import (CountTokens, Haystack, SentenceStream, as_rng, fit_haystack, fit_length,
                                   tolerance)

KV_HEADER = "JSON data:\n"


def pair_text(k: str, v: str) -> str:
  return f'"{k}": "{v}"'


def kv_text(pairs: list[tuple[str, str]]) -> str:
  return "{" + ", ".join(pair_text(k, v) for k, v in pairs) + "}"


def pair_offset(pairs: list[tuple[str, str]], i: int) -> int:
  """Character offset of pair i inside `kv_text(pairs)`."""
  return 1 + sum(len(pair_text(k, v)) + 2 for k, v in pairs[:i])


def uuid_pairs(rng: random.Random) -> SentenceStream:
  """An endless stream of (uuid, uuid) pairs."""
  return SentenceStream(lambda: (words.uuid(rng), words.uuid(rng)))


def pad_text(sentences: list[str], tail: str = "") -> str:
  pieces = sentences + [tail] if tail else sentences
  return " ".join(pieces) + "\n" if pieces else ""


def fit_padded(core: Callable[[int], str], target: int, count_tokens: CountTokens, *, guess: int,
               pad: SentenceStream, what: str) -> tuple[int, str, str, int]:
  """Fit `core(n)` (coarse units) to `target`, then put prose before it (whole sentences and a cut-off
  one) to close the gap. Returns (n, pad, text, tokens): text = pad + core(n)."""
  n, text, tokens = fit_length(core, target, count_tokens, guess=guess, what=what)
  if target - tokens <= max(2, tolerance(target) // 4):
    return n, "", text, tokens
  body = core(n)
  sentences, tail, text, tokens = fit_haystack(lambda s, t: pad_text(s, t) + body, pad, target, count_tokens,
                                               what=what)
  return n, pad_text(sentences, tail), text, tokens


def kv_question(key: str) -> str:
  return f'\nQuestion: What is the value of key "{key}"?\nAnswer: The value of key "{key}" is'


@register("kv_uuid", "a JSON object of UUID keys and values; asks for the value of the key at `depth`")
def kv_uuid(length_tokens: int, depth, seed, count_tokens: CountTokens) -> Sample:
  rng = as_rng(seed, "kv_uuid")
  d = rng.random() if depth is None else float(depth)
  pairs = uuid_pairs(random.Random(rng.getrandbits(64)))
  pad = Haystack.prose().stream(rng.getrandbits(64))

  def index(n_pairs: int) -> int:
    return round(d * (n_pairs - 1))

  def core(n: int) -> str:  # n + 1 pairs, so that there is always one to ask about
    ps = pairs.first(n + 1)
    return KV_HEADER + kv_text(ps) + kv_question(ps[index(n + 1)][0])

  rate = max(1.0, count_tokens(kv_text(pairs.first(16))) / 16)
  guess = int((length_tokens - count_tokens(core(0))) / rate)
  n, padding, _, tokens = fit_padded(core, length_tokens, count_tokens, guess=max(1, guess), pad=pad,
                                     what="task 'kv_uuid'")
  ps = pairs.first(n + 1)
  i = index(n + 1)
  prefix = padding + KV_HEADER
  context = prefix + kv_text(ps)
  char = len(prefix) + pair_offset(ps, i)
  ctx_tokens = count_tokens(context)
  tok = count_tokens(context[:char].rstrip())
  meta = {"depth": round(d, 6), "requested_depth": depth, "num_pairs": len(ps), "padding": padding,
          "context_tokens": ctx_tokens, "prompt_tokens": tokens,
          "needles": [{"key": ps[i][0], "value": ps[i][1], "index": i, "role": "target", "char_offset": char,
                       "token_offset": tok, "token_depth": round(tok / max(ctx_tokens, 1), 4)}]}
  return Sample(context=context, question=kv_question(ps[i][0]), answers=(ps[i][1],), task="kv_uuid", meta=meta)
