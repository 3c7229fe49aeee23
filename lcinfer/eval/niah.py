"""Needle-in-a-haystack tasks: NIAH (Kamradt 2023) and RULER's variants (Hsieh et al. 2024,
"RULER: What's the Real Context Size of Your Long-Context Language Models?"): single, multi-key,
multi-value, multi-query, and variable tracking (vt).

Needles are sentences placed between haystack sentences: a needle at depth d goes after
round(d * n) of the n haystack sentences, so depth 0 is the start of the context and 1 its end.
"""

from __future__ import annotations

import dataclasses
import random

from lcinfer.errors import ConfigError
from lcinfer.eval import words
from lcinfer.eval.base import Sample, register
from lcinfer.eval.haystack import CountTokens, Haystack, SentenceStream, as_rng, fit_haystack

NIAH_HEADER = "Some special magic numbers are hidden in the following text. Remember them.\n"
NEEDLE = "The special magic number for {key} is {value}."
VT_HEADER = "Memorize the variable assignments hidden in the following text.\n"


@dataclasses.dataclass(frozen=True)
class Needle:
  text: str
  depth: float  # where to place it, 0..1
  info: dict  # recorded in meta (key, value, role, ...)


def join_phrase(items) -> str:
  """Items as a phrase: a / a and b / a, b and c."""
  items = list(items)
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _body(sentences: list[str], needles: list[Needle], tail: str = "") -> tuple[str, list[int]]:
  """Haystack sentences with the needles inserted, then `tail` (a cut-off sentence, if any); also
  each needle's character offset in the body."""
  n = len(sentences)
  order = sorted(range(len(needles)), key=lambda i: (round(needles[i].depth * n), i))
  pieces, offsets, pos, start = [], [0] * len(needles), 0, 0
  for i in order:
    idx = round(needles[i].depth * n)
    for s in sentences[start:idx]:
      pieces.append(s)
      pos += len(s) + 1
    start = max(start, idx)
    offsets[i] = pos
    pieces.append(needles[i].text)
    pos += len(needles[i].text) + 1
  pieces.extend(sentences[start:])
  if tail:
    pieces.append(tail)
  return " ".join(pieces), offsets


def place_needles(header: str, needles: list[Needle], question: str, hay: SentenceStream, target: int,
                  count_tokens: CountTokens, what: str, fit_context_only: bool = False) -> tuple[str, dict]:
  """Fit `header + haystack-with-needles (+ question)` to `target` tokens. Returns the context and meta
  (context/prompt tokens, haystack sentence count, per-needle offsets and measured token depths)."""
  end = "" if fit_context_only else question

  def build(sentences: list[str], tail: str) -> str:
    return header + _body(sentences, needles, tail)[0] + end

  sentences, tail, _, tokens = fit_haystack(build, hay, target, count_tokens, what=what)
  body, offsets = _body(sentences, needles, tail)
  context = header + body
  ctx_tokens = count_tokens(context)
  meta_needles = []
  for nd, off in zip(needles, offsets):
    char = len(header) + off
    tok = count_tokens(context[:char].rstrip())
    meta_needles.append({**nd.info, "text": nd.text, "char_offset": char, "token_offset": tok,
                         "token_depth": round(tok / max(ctx_tokens, 1), 4)})
  meta = {"context_tokens": ctx_tokens, "haystack_sentences": len(sentences), "haystack_tail": tail,
          "needles": meta_needles}
  if not fit_context_only:
    meta["prompt_tokens"] = tokens
  return context, meta


def _setup(task, seed, haystack, depth):
  rng = as_rng(seed, task)
  hay = Haystack.resolve(haystack)
  stream = hay.stream(rng.getrandbits(64))
  d = rng.random() if depth is None else float(depth)
  return rng, hay, stream, d


def _needle_sample(task, rng, hay, stream, d, depth, needles, question, answers, length_tokens, count_tokens,
                   header=NIAH_HEADER, **meta) -> Sample:
  context, m = place_needles(header, needles, question, stream, length_tokens, count_tokens, f"task {task!r}")
  meta = {"depth": round(d, 6), "requested_depth": depth, "haystack": hay.kind, **meta, **m}
  return Sample(context=context, question=question, answers=tuple(answers), task=task, meta=meta)


def _check_count(name, v, lo=1):
  if isinstance(v, bool) or not isinstance(v, int) or v < lo:
    raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")


def _check_digits(v):
  if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 12:
    raise ConfigError(f"value_digits must be an int in [2, 12], got {v!r}")


def _question_one(key):
  return f"\nQuestion: What is the special magic number for {key}?\nAnswer: The special magic number for {key} is"


@register("niah_single", "one needle 'The special magic number for KEY is VALUE.' at `depth`; asks for VALUE")
def niah_single(length_tokens: int, depth, seed, count_tokens: CountTokens, *, haystack="prose",
                value_digits: int = 7) -> Sample:
  _check_digits(value_digits)
  rng, hay, stream, d = _setup("niah_single", seed, haystack, depth)
  key, value = words.key_word(rng), words.number(rng, value_digits)
  needles = [Needle(NEEDLE.format(key=key, value=value), d, {"key": key, "value": value, "role": "target"})]
  return _needle_sample("niah_single", rng, hay, stream, d, depth, needles, _question_one(key), [value],
                        length_tokens, count_tokens)


@register("niah_multikey", "a needle at `depth` plus distractor needles with other keys at random depths")
def niah_multikey(length_tokens: int, depth, seed, count_tokens: CountTokens, *, num_distractors: int = 3,
                  haystack="prose", value_digits: int = 7) -> Sample:
  _check_count("num_distractors", num_distractors, 0)
  _check_digits(value_digits)
  rng, hay, stream, d = _setup("niah_multikey", seed, haystack, depth)
  keys = words.distinct(rng, words.key_word, 1 + num_distractors)
  values = words.distinct(rng, lambda r: words.number(r, value_digits), 1 + num_distractors)
  needles = [Needle(NEEDLE.format(key=k, value=v), d if i == 0 else rng.random(),
                    {"key": k, "value": v, "role": "target" if i == 0 else "distractor"})
             for i, (k, v) in enumerate(zip(keys, values))]
  return _needle_sample("niah_multikey", rng, hay, stream, d, depth, needles, _question_one(keys[0]),
                        [values[0]], length_tokens, count_tokens)


@register("niah_multivalue", "several needles with the same key and different values; asks for all values")
def niah_multivalue(length_tokens: int, depth, seed, count_tokens: CountTokens, *, num_values: int = 4,
                    haystack="prose", value_digits: int = 7) -> Sample:
  _check_count("num_values", num_values)
  _check_digits(value_digits)
  rng, hay, stream, d = _setup("niah_multivalue", seed, haystack, depth)
  key = words.key_word(rng)
  values = words.distinct(rng, lambda r: words.number(r, value_digits), num_values)
  needles = [Needle(NEEDLE.format(key=key, value=v), d if i == 0 else rng.random(),
                    {"key": key, "value": v, "role": "target"}) for i, v in enumerate(values)]
  q = f"\nQuestion: What are all the special magic numbers for {key}?\nAnswer: The special magic numbers for {key} are"
  s = _needle_sample("niah_multivalue", rng, hay, stream, d, depth, needles, q, values, length_tokens,
                     count_tokens)
  in_order = [nd["value"] for nd in sorted(s.meta["needles"], key=lambda nd: nd["char_offset"])]
  return dataclasses.replace(s, answers=tuple(in_order))  # the order they appear in the context


@register("niah_multiquery", "needles with different keys; the question asks for several keys at once")
def niah_multiquery(length_tokens: int, depth, seed, count_tokens: CountTokens, *, num_queries: int = 2,
                    num_distractors: int = 2, haystack="prose", value_digits: int = 7) -> Sample:
  _check_count("num_queries", num_queries)
  _check_count("num_distractors", num_distractors, 0)
  _check_digits(value_digits)
  rng, hay, stream, d = _setup("niah_multiquery", seed, haystack, depth)
  k = num_queries + num_distractors
  keys = words.distinct(rng, words.key_word, k)
  values = words.distinct(rng, lambda r: words.number(r, value_digits), k)
  needles = [Needle(NEEDLE.format(key=kk, value=v), d if i == 0 else rng.random(),
                    {"key": kk, "value": v, "role": "target" if i < num_queries else "distractor"})
             for i, (kk, v) in enumerate(zip(keys, values))]
  asked = join_phrase(keys[:num_queries])
  q = f"\nQuestion: What are the special magic numbers for {asked}?\nAnswer: The special magic numbers for {asked} are"
  return _needle_sample("niah_multiquery", rng, hay, stream, d, depth, needles, q, values[:num_queries],
                        length_tokens, count_tokens)


def vt_chain(rng: random.Random, names: list[str], value: str, depths: list[float], role: str) -> list[Needle]:
  """`VAR A = value.`, `VAR B = VAR A.`, ... placed at `depths` (sorted, so the chain reads in order)."""
  texts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
  return [Needle(t, dd, {"var": nm, "value": value, "hop": i, "role": role})
          for i, (t, dd, nm) in enumerate(zip(texts, sorted(depths), names))]


def vt_window(d: float, count: int, spread: float) -> list[float]:
  """`count` evenly spaced depths over a window of width `spread` centred on d, kept inside [0, 1]."""
  lo = min(max(d - spread / 2, 0.0), 1.0 - spread)
  return [lo + spread * i / max(count - 1, 1) for i in range(count)]


@register("vt", "variable tracking: 'VAR A = 12345.' then 'VAR B = VAR A.' ...; asks which variables hold 12345")
def variable_tracking(length_tokens: int, depth, seed, count_tokens: CountTokens, *, num_chains: int = 1,
                      num_hops: int = 4, spread: float = 0.5, haystack="prose") -> Sample:
  """The asked chain's statements are spread evenly over a window of width `spread` centred on
  `depth`; distractor chains (num_chains - 1, other values) go at random depths. Answers: the
  chain's num_hops + 1 variable names, in chain order (RULER's vt)."""
  _check_count("num_chains", num_chains)
  _check_count("num_hops", num_hops, 0)
  if isinstance(spread, bool) or not isinstance(spread, int | float) or not 0 <= spread <= 1:
    raise ConfigError(f"spread must be in [0, 1], got {spread!r}")
  rng, hay, stream, d = _setup("vt", seed, haystack, depth)
  names = words.distinct(rng, words.var_name, num_chains * (num_hops + 1))
  values = words.distinct(rng, lambda r: words.number(r, 5), num_chains)
  needles = []
  for c in range(num_chains):
    chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
    depths = vt_window(d, num_hops + 1, spread) if c == 0 else [rng.random() for _ in chain]
    needles += vt_chain(rng, chain, values[c], depths, "target" if c == 0 else "distractor")
  q = f"\nQuestion: Which variables are assigned the value {values[0]}?\nAnswer: The variables assigned the value {values[0]} are"
  return _needle_sample("vt", rng, hay, stream, d, depth, needles, q, names[:num_hops + 1], length_tokens,
                        count_tokens, header=VT_HEADER)
