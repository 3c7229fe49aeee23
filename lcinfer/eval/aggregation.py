"""Aggregation tasks from RULER (Hsieh et al. 2024): common words extraction (cwe) and frequent
words extraction (fwe). There is no needle: `depth` is ignored (recorded as None).
"""

from __future__ import annotations

import random

from lcinfer.errors import ConfigError
from lcinfer.eval import words
from lcinfer.eval.base import Sample, register
from lcinfer.eval.haystack import CountTokens, as_rng, fit_length, tolerance

CWE_HEADER = "Below is a numbered list of words. Some words appear more often than others.\n"
FWE_HEADER = "Below is a coded text. Some coded words appear more often than others.\n"


def _numbered(items: list[str]) -> str:
  return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))


@register("cwe", "common words extraction: a numbered word list where num_common words repeat more often; "
          "asks for them", uses_depth=False)
def common_words(length_tokens: int, depth, seed, count_tokens: CountTokens, *, num_common: int = 10,
                 common_freq: int | None = None, uncommon_freq: int | None = None) -> Sample:
  """num_common words appear common_freq times each, every other word uncommon_freq times, shuffled.
  RULER uses 30 and 3; by default (None) the frequencies shrink for short lengths so that the
  common words fill at most half of the list: common_freq = min(30, items / (2 * num_common)),
  uncommon_freq = min(3, common_freq // 4), at least 2 and 1. Answers: the common words in order
  of first appearance."""
  for name, v in (("num_common", num_common), ("common_freq", common_freq), ("uncommon_freq", uncommon_freq)):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise ConfigError(f"{name} must be a positive int (or None for the default), got {v!r}")
  rng = as_rng(seed, "cwe")
  pool = words.word_stream(rng)
  shuffle_seed = rng.getrandbits(64)
  q = (f"\nQuestion: What are the {num_common} most common words in the list above?\n"
       f"Answer: The {num_common} most common words are")
  rate = max(1.0, count_tokens(_numbered(pool(64))) / 64)
  est_items = max(0.0, (length_tokens - count_tokens(CWE_HEADER + q)) / rate)
  cf = common_freq or max(2, min(30, int(est_items / (2 * num_common))))
  uf = uncommon_freq or max(1, min(3, cf // 4))
  if cf <= uf:
    raise ConfigError(f"cwe needs common_freq > uncommon_freq, got {cf} and {uf}")

  def items(n: int) -> tuple[list[str], list[str]]:
    r = random.Random(shuffle_seed)
    chosen = pool(num_common + n)
    common = r.sample(chosen, num_common)
    cs = set(common)
    lst = [w for w in common for _ in range(cf)] + [w for w in chosen if w not in cs for _ in range(uf)]
    r.shuffle(lst)
    return lst, common

  def build(n: int) -> str:
    return CWE_HEADER + _numbered(items(n)[0]) + q

  guess = int((est_items - cf * num_common) / uf)
  n, _, tokens = fit_length(build, length_tokens, count_tokens, guess=max(1, guess), what="task 'cwe'")
  lst, common = items(n)
  first = {w: lst.index(w) for w in common}
  context = CWE_HEADER + _numbered(lst)
  meta = {"depth": None, "requested_depth": depth, "common_freq": cf, "uncommon_freq": uf,
          "num_uncommon": n, "num_items": len(lst), "context_tokens": count_tokens(context),
          "prompt_tokens": tokens}
  return Sample(context=context, question=q, answers=tuple(sorted(common, key=first.get)), task="cwe", meta=meta)


@register("fwe", "frequent words extraction: coded words with Zipf-distributed counts; asks for the most "
          "frequent ones", uses_depth=False)
def frequent_words(length_tokens: int, depth, seed, count_tokens: CountTokens, *, num_answers: int = 3,
                   alpha: float = 2.0, vocab_size: int = 2000, word_length: int = 6) -> Sample:
  """RULER's fwe: the word of rank k appears floor(N * k^-alpha / H) times (H = sum_k k^-alpha over
  the vocabulary), shuffled; N is chosen to fill the length, and the next few ranks' words once
  each to close the last gap. Answers: the num_answers most frequent words, most frequent first.
  (RULER's rank-1 "...." noise word is left out.)"""
  for name, v, lo in (("num_answers", num_answers, 1), ("vocab_size", vocab_size, 2), ("word_length", word_length, 3)):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
      raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
  if num_answers >= vocab_size:
    raise ConfigError(f"num_answers ({num_answers}) must be smaller than vocab_size ({vocab_size})")
  if not isinstance(alpha, int | float) or alpha <= 0:
    raise ConfigError(f"alpha must be a positive number, got {alpha!r}")
  rng = as_rng(seed, "fwe")
  vocab = words.distinct(rng, lambda r: words.coded_word(r, word_length), vocab_size)
  shuffle_seed = rng.getrandbits(64)
  weights = [k ** -alpha for k in range(1, vocab_size + 1)]
  h = sum(weights)
  q = (f"\nQuestion: What are the {num_answers} most frequent coded words in the text above?\n"
       f"Answer: The {num_answers} most frequent coded words are")

  def counts(n: int, extra: int = 0) -> list[int]:
    c = [int(n * w / h) for w in weights]
    first_zero = next((i for i, x in enumerate(c) if x == 0), len(c))
    return [x + (first_zero <= i < first_zero + extra) for i, x in enumerate(c)]

  def text_items(n: int, extra: int = 0) -> list[str]:
    lst = [w for w, c in zip(vocab, counts(n, extra)) for _ in range(c)]
    random.Random(shuffle_seed).shuffle(lst)
    return lst

  def build(n: int, extra: int = 0) -> str:
    return FWE_HEADER + " ".join(text_items(n, extra)) + q

  rate = max(1.0, count_tokens(" ".join(vocab[:64])) / 64)
  guess = int((length_tokens - count_tokens(FWE_HEADER + q)) / rate)
  n, _, tokens = fit_length(build, length_tokens, count_tokens, guess=max(1, guess), what="task 'fwe'")
  zeros = sum(x == 0 for x in counts(n))
  extra = 0
  if length_tokens - tokens > max(2, tolerance(length_tokens) // 4) and zeros:
    extra, _, tokens = fit_length(lambda e: build(n, e), length_tokens, count_tokens, max_n=zeros,
                                  guess=max(1, int((length_tokens - tokens) / rate)), what="task 'fwe'")
  c = counts(n, extra)
  if c[num_answers] >= c[num_answers - 1]:
    raise ConfigError(f"length_tokens={length_tokens} is too short for fwe with num_answers={num_answers}: the "
                      f"top words' counts tie ({c[:num_answers + 1]}); use a longer length or a larger alpha")
  context = FWE_HEADER + " ".join(text_items(n, extra))
  meta = {"depth": None, "requested_depth": depth, "num_words": sum(c), "top_counts": c[:num_answers + 1],
          "context_tokens": count_tokens(context), "prompt_tokens": tokens}
  return Sample(context=context, question=q, answers=tuple(vocab[:num_answers]), task="fwe", meta=meta)
