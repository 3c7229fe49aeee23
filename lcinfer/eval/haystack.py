"""Filler text ("haystacks") and fitting a generated text to a length in tokens.

    hay = Haystack.prose()                      # seeded English-like prose (built-in words, templates)
    hay = Haystack.noise()                      # RULER's "The grass is green. ..." repeated
    hay = Haystack.from_text(open("essays.txt").read())   # user text, cut and repeated (Kamradt 2023)
    sentences = hay.stream(seed).first(200)     # the first 200 sentences; the stream is endless

Lengths are in tokens of a caller's tokenizer, given as `count_tokens(text) -> int` (see
`token_counter`; `whitespace_count` when no tokenizer is at hand). `fit_length` finds how many
units (sentences, list items, key-value pairs) a text needs to reach a target with a handful of
`count_tokens` calls on the whole text: secant steps from a measured tokens-per-unit rate, then
bisection. Counting the whole text, not summing per-sentence counts, keeps it exact for any
tokenizer (merges across sentence boundaries included).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from typing import Callable

from lcinfer.errors import ConfigError
from lcinfer.eval import words

CountTokens = Callable[[str], int]


def whitespace_count(text: str) -> int:
  """Whitespace-separated words: a tokenizer-free stand-in for `count_tokens` (tests, quick looks)."""
  return len(text.split())


def token_counter(tokenizer) -> CountTokens:
  """`count_tokens` for an lcinfer `Tokenizer` (or anything with `encode(text, add_special_tokens=)`),
  counting the text's own tokens: no BOS/EOS."""
  def count(text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))
  return count


def tolerance(target: int) -> int:
  """How far below `target` a fitted text may end: 2% or 16 tokens, whichever is larger."""
  return max(16, int(0.02 * target))


def as_rng(seed: int | random.Random, salt: str = "") -> random.Random:
  """A `random.Random` from an int seed, salted (tasks pass their name, so that one seed gives
  unrelated draws in different tasks); a given `Random` is used (and advanced) as is."""
  if isinstance(seed, random.Random):
    return seed
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ConfigError(f"seed must be an int or a random.Random, got {type(seed).__name__}")
  return random.Random(f"{salt}/{seed}" if salt else seed)


class SentenceStream:
  """An endless, deterministic sequence of sentences; `first(n)` extends it as needed."""

  def __init__(self, next_sentence: Callable[[], str]):
    self._next = next_sentence
    self._cache: list[str] = []

  def first(self, n: int) -> list[str]:
    while len(self._cache) < n:
      self._cache.append(self._next())
    return self._cache[:n]


@dataclasses.dataclass(frozen=True)
class Haystack:
  """Where filler sentences come from: "prose" (generated from the seed), "noise" (RULER's five
  sentences), or "text" (the user's text split into sentences, repeated from its start)."""

  kind: str = "prose"
  sentences: tuple[str, ...] = ()

  @staticmethod
  def prose() -> "Haystack":
    return Haystack("prose")

  @staticmethod
  def noise() -> "Haystack":
    return Haystack("noise", words.NOISE_SENTENCES)

  @staticmethod
  def from_text(text: str) -> "Haystack":
    """Split at sentence ends (. ! ? followed by white space); white space between sentences becomes
    one space. Text without sentence ends is cut into 40-word pieces."""
    if not isinstance(text, str) or not text.strip():
      raise ConfigError("Haystack.from_text needs a non-empty string of filler text")
    parts = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    out = []
    for p in parts:
      w = p.split()
      out.extend(" ".join(w[i:i + 40]) for i in range(0, len(w), 40))
    return Haystack("text", tuple(out))

  @staticmethod
  def resolve(spec: "str | Haystack") -> "Haystack":
    """A Haystack from "prose", "noise", or a Haystack (use `Haystack.from_text` for your own text)."""
    if isinstance(spec, Haystack):
      return spec
    if spec == "prose":
      return Haystack.prose()
    if spec == "noise":
      return Haystack.noise()
    raise ConfigError(f"haystack must be 'prose', 'noise' or a Haystack (Haystack.from_text(text) for your own "
                      f"text), got {spec!r:.60}")

  def stream(self, seed: int | random.Random) -> SentenceStream:
    if self.kind == "prose":
      rng = as_rng(seed)
      return SentenceStream(lambda: words.prose_sentence(rng))
    it = itertools.count()
    return SentenceStream(lambda: self.sentences[next(it) % len(self.sentences)])


def fit_length(build: Callable[[int], str], target: int, count_tokens: CountTokens, *, guess: int,
               what: str, max_n: int | None = None, tol: int | None = None) -> tuple[int, str, int]:
  """The largest n (0 <= n <= max_n) with `count_tokens(build(n)) <= target`, or one within `tol` of
  it (default: a quarter of `tolerance(target)`). `build` must grow with n. Returns (n, text, tokens).

  A few whole-text counts: secant steps from the measured tokens per unit, bisection as a fallback.
  """
  tol = max(2, tolerance(target) // 4) if tol is None else tol
  seen: dict[int, int] = {}

  def f(n: int) -> int:
    if n not in seen:
      seen[n] = count_tokens(build(n))
    return seen[n]

  c0 = f(0)
  if c0 > target:
    raise ConfigError(f"length_tokens={target} is too short for {what}: its fixed parts alone take {c0} tokens; "
                      f"ask for at least {c0 + 64}")
  lo, hi = 0, None  # f(lo) <= target < f(hi)
  n = max(1, guess)
  for _ in range(100):
    if max_n is not None:
      n = min(n, max_n)
    if n <= lo or (hi is not None and n >= hi):
      break
    c = f(n)
    if c <= target:
      lo = n
      if target - c <= tol or n == max_n:
        break
    else:
      hi = n
    if hi is not None and hi - lo <= 1:
      break
    aim = target - tol / 2
    if hi is None:  # extrapolate the rate measured so far
      rate = (f(lo) - c0) / lo if lo > 0 else None
      if rate == 0:
        raise ValueError(f"{what}: the text does not grow with n (n={lo} counts as {c0} tokens, as n=0 does)")
      n = lo + max(1, math.floor((aim - f(lo)) / rate)) if rate else 2 * max(lo, 1)
    else:
      rate = (f(hi) - f(lo)) / (hi - lo)
      n = lo + math.floor((aim - f(lo)) / rate) if rate > 0 else (lo + hi) // 2
      if n in seen or not lo < n < hi:
        n = (lo + hi) // 2
  return lo, build(lo), f(lo)


def fit_haystack(build: Callable[[list[str], str], str], stream: SentenceStream, target: int,
                 count_tokens: CountTokens, *, what: str) -> tuple[list[str], str, str, int]:
  """Fit `build(sentences, tail)` to `target`: as many whole sentences of `stream` as fit, then the
  first words of the next one as a cut-off `tail` (the haystack is truncated mid-sentence, as in
  Kamradt's NIAH), so the text ends within a few tokens of the target whatever the sentence
  length. Returns (sentences, tail, text, tokens)."""
  rate = max(1.0, count_tokens(" ".join(stream.first(32))) / 32)
  fixed = count_tokens(build([], ""))
  n, text, tokens = fit_length(lambda n: build(stream.first(n), ""), target, count_tokens,
                               guess=max(1, int((target - fixed) / rate)), what=what)
  sentences, tail = stream.first(n), ""
  if target - tokens > max(2, tolerance(target) // 4):
    ws = stream.first(n + 1)[n].split()
    per_word = max(1.0, count_tokens(" ".join(stream.first(n + 1)[n:])) / max(len(ws), 1))
    w, text, tokens = fit_length(lambda w: build(sentences, " ".join(ws[:w])), target, count_tokens,
                                 guess=max(1, int((target - tokens) / per_word)), max_n=len(ws) - 1, what=what)
    tail = " ".join(ws[:w])
  return sentences, tail, text, tokens
