"""SCBench-style shared-context sessions (Li et al. 2024, "SCBench: A KV Cache-Centric Analysis of
Long-Context Methods"): one long context, several queries about it, so a KV cache built for the
context is reused across turns.

    s = make_session("kv", 8192, num_turns=4, protocol="multi_turn", seed=0, count_tokens=count)
    for i, prompt in enumerate(session_prompts(s)): ...       # golden answers fill earlier turns
    s.prompt(i, responses=model_outputs[:i])                   # or the model's own answers
    score_session(s, outputs)                                  # one score per turn

Protocols: "multi_turn": prompt i = context + q0 + a0 + ... + q_i (each prompt extends the previous
one, so the cache is reused and extended); "multi_request": prompt i = context + q_i (one shared
prefix, independent queries). `length_tokens` is the length of the shared context.

Tasks: "kv" (UUID key-value retrieval, one key per turn), "prefix_suffix" (the one string in a list
with a given prefix and suffix), "vt" (variable tracking, a different chain per turn), "mf" (math
find: the largest or smallest number of a named list, a different list per turn).
"""

from __future__ import annotations

import dataclasses
import random
import string as string_lib
from typing import Sequence

from lcinfer.errors import ConfigError
from lcinfer.eval import words
from lcinfer.eval.base import format_target, string_match_all
from lcinfer.eval.haystack import (CountTokens, Haystack, SentenceStream, as_rng, fit_length, whitespace_count)
from lcinfer.eval.kv import KV_HEADER, fit_padded, kv_question, kv_text, pair_offset, uuid_pairs
from lcinfer.eval.niah import VT_HEADER, place_needles, vt_chain

PROTOCOLS = ("multi_turn", "multi_request")
SESSION_TASKS = ("kv", "prefix_suffix", "vt", "mf")
PS_HEADER = "Here is a list of strings, one per line:\n"
MF_HEADER = "Here are some lists of numbers:\n"


@dataclasses.dataclass(frozen=True)
class Turn:
  question: str
  answers: tuple[str, ...]

  @property
  def target(self) -> str:
    """The canonical answer text (also what fills this turn in later multi_turn prompts)."""
    return format_target(self.answers)


@dataclasses.dataclass(frozen=True)
class Session:
  context: str
  turns: tuple[Turn, ...]
  task: str
  protocol: str
  meta: dict = dataclasses.field(default_factory=dict)

  def prompt(self, i: int, responses: Sequence[str] | None = None) -> str:
    """The prompt of turn i. multi_turn: earlier turns are filled with `responses[j]` (what the model
    answered) or, without them, the golden `turns[j].target`."""
    if not 0 <= i < len(self.turns):
      raise IndexError(f"turn {i} of a {len(self.turns)}-turn session")
    if self.protocol == "multi_request":
      return self.context + self.turns[i].question
    if responses is not None and len(responses) < i:
      raise ValueError(f"turn {i} of a multi_turn session needs the {i} earlier responses, got {len(responses)}")
    parts = [self.context]
    for j in range(i):
      parts += [self.turns[j].question, responses[j] if responses is not None else self.turns[j].target]
    parts.append(self.turns[i].question)
    return "".join(parts)


def session_prompts(session: Session, responses: Sequence[str] | None = None) -> tuple[str, ...]:
  """Every turn's prompt, in order (see `Session.prompt`)."""
  return tuple(session.prompt(i, responses) for i in range(len(session.turns)))


def score_session(session: Session, outputs: Sequence[str], whole_word: bool = True) -> tuple[float, ...]:
  """Per turn: the fraction of the turn's answers found in its output (RULER's string match)."""
  if len(outputs) != len(session.turns):
    raise ValueError(f"expected {len(session.turns)} outputs (one per turn), got {len(outputs)}")
  return tuple(string_match_all(t.answers, o, whole_word) for t, o in zip(session.turns, outputs))


def make_session(task: str, length_tokens: int, num_turns: int = 5, protocol: str = "multi_turn",
                 seed: int | random.Random = 0, count_tokens: CountTokens = whitespace_count) -> Session:
  """A session of `num_turns` queries over one context of at most `length_tokens` tokens (and at least
  that minus 2% or 16 tokens)."""
  if task not in _MAKERS:
    raise ConfigError(f"unknown SCBench task {task!r}; available: {', '.join(SESSION_TASKS)}")
  if protocol not in PROTOCOLS:
    raise ConfigError(f"unknown protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
  if isinstance(num_turns, bool) or not isinstance(num_turns, int) or num_turns < 1:
    raise ConfigError(f"num_turns must be a positive int, got {num_turns!r}")
  if isinstance(length_tokens, bool) or not isinstance(length_tokens, int) or length_tokens <= 0:
    raise ConfigError(f"length_tokens must be a positive int, got {length_tokens!r}")
  rng = as_rng(seed, f"scbench/{task}")
  context, turns, meta = _MAKERS[task](rng, length_tokens, num_turns, count_tokens, f"SCBench task {task!r}")
  meta = {**meta, "context_tokens": count_tokens(context)}
  return Session(context=context, turns=tuple(turns), task=task, protocol=protocol, meta=meta)


def _spread_depths(rng: random.Random, k: int) -> list[float]:
  """k depths, one in each of k equal slices of [0, 1], in random order."""
  d = [(i + rng.random()) / k for i in range(k)]
  rng.shuffle(d)
  return d


def _kv(rng, length_tokens, num_turns, count_tokens, what):
  pairs = uuid_pairs(random.Random(rng.getrandbits(64)))
  pad = Haystack.prose().stream(rng.getrandbits(64))
  depths = _spread_depths(rng, num_turns)

  def core(n: int) -> str:
    return KV_HEADER + kv_text(pairs.first(n + num_turns))

  rate = max(1.0, count_tokens(kv_text(pairs.first(16))) / 16)
  n, padding, context, _ = fit_padded(core, length_tokens, count_tokens, guess=max(1, int(length_tokens / rate)),
                                pad=pad, what=what)
  ps = pairs.first(n + num_turns)
  idx = [round(d * (len(ps) - 1)) for d in depths]
  if len(set(idx)) < num_turns:  # very short contexts: fall back to distinct evenly spaced pairs
    idx = rng.sample(range(len(ps)), num_turns)
  turns = [Turn(kv_question(ps[i][0]), (ps[i][1],)) for i in idx]
  prefix = len(padding + KV_HEADER)
  return context, turns, {"num_pairs": len(ps), "padding": padding, "indices": idx,
                          "char_offsets": [prefix + pair_offset(ps, i) for i in idx]}


def _random_string(rng: random.Random, length: int) -> str:
  return "".join(rng.choice(string_lib.ascii_lowercase) for _ in range(length))


def _prefix_suffix(rng, length_tokens, num_turns, count_tokens, what, length: int = 12, affix: int = 4):
  targets = words.distinct(rng, lambda r: _random_string(r, length), num_turns)
  prefixes = {t[:affix] for t in targets}
  suffixes = {t[-affix:] for t in targets}
  if len(prefixes) < num_turns or len(suffixes) < num_turns:
    raise ConfigError(f"{what}: could not draw {num_turns} distinct prefixes; use fewer turns")
  special = []  # each target and two distractors: same prefix / other suffix, other prefix / same suffix
  for t in targets:
    special.append((t, "target"))
    special.append((t[:affix] + _fresh(rng, length - affix, affix, suffixes, at_end=True), "distractor"))
    special.append((_fresh(rng, length - affix, affix, prefixes, at_end=False) + t[-affix:], "distractor"))
  depths = [rng.random() for _ in special]
  bg_rng = random.Random(rng.getrandbits(64))

  def background() -> str:
    while True:
      s = _random_string(bg_rng, length)
      if s[:affix] not in prefixes and s[-affix:] not in suffixes:
        return s
  stream = SentenceStream(background)

  def lines(n: int) -> list[str]:
    bg = stream.first(n)
    order = sorted(range(len(special)), key=lambda i: (round(depths[i] * n), i))
    out, start = [], 0
    for i in order:
      idx = round(depths[i] * n)
      out += bg[start:idx]
      start = max(start, idx)
      out.append(special[i][0])
    return out + bg[start:]

  def build(n: int) -> str:
    return PS_HEADER + "\n".join(lines(n))

  rate = max(1.0, count_tokens("\n".join(stream.first(32))) / 32)
  n, context, _ = fit_length(build, length_tokens, count_tokens, guess=max(1, int(length_tokens / rate)),
                             what=what)
  final = lines(n)
  turns = []
  for t in targets:
    p, s = t[:affix], t[-affix:]
    assert [x for x in final if x.startswith(p) and x.endswith(s)] == [t]
    turns.append(Turn(f'\nQuestion: Which string starts with "{p}" and ends with "{s}"?\nAnswer:', (t,)))
  return context, turns, {"num_strings": len(final), "line_index": [final.index(t) for t in targets]}


def _fresh(rng, k: int, affix: int, taken: set[str], at_end: bool) -> str:
  """k random letters whose last (at_end) or first `affix` letters are none of `taken`."""
  while True:
    s = _random_string(rng, k)
    if (s[-affix:] if at_end else s[:affix]) not in taken:
      return s


def _vt(rng, length_tokens, num_turns, count_tokens, what, num_hops: int = 4):
  stream = Haystack.prose().stream(rng.getrandbits(64))
  names = words.distinct(rng, words.var_name, num_turns * (num_hops + 1))
  values = words.distinct(rng, lambda r: words.number(r, 5), num_turns)
  needles, turns = [], []
  for c in range(num_turns):
    chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
    needles += vt_chain(rng, chain, values[c], [rng.random() for _ in chain], f"turn {c}")
    turns.append(Turn(f"\nQuestion: Which variables are assigned the value {values[c]}?\nAnswer:", tuple(chain)))
  context, meta = place_needles(VT_HEADER, needles, "", stream, length_tokens, count_tokens, what,
                                fit_context_only=True)
  return context, turns, meta


def _mf(rng, length_tokens, num_turns, count_tokens, what):
  """Numbers are distinct within a list, below max_value: 100000, or more when a list must hold more
  than a quarter of that, so that every list has one largest and one smallest number."""
  max_value = 100000
  while max_value < 4 * length_tokens / num_turns:  # a number is at least one token
    max_value *= 10
  names = words.distinct(rng, lambda r: words.var_name(r, 3), num_turns)
  kinds = ["largest" if i % 2 == 0 else "smallest" for i in range(num_turns)]
  rng.shuffle(kinds)

  def number_stream(r: random.Random) -> SentenceStream:
    seen: set[int] = set()

    def nxt() -> int:
      while True:
        x = r.randrange(max_value)
        if x not in seen:
          seen.add(x)
          return x
    return SentenceStream(nxt)
  lists = [number_stream(random.Random(rng.getrandbits(64))) for _ in range(num_turns)]

  def sizes(n: int) -> list[int]:  # n + num_turns numbers dealt round-robin: every list has one or more
    total = n + num_turns
    return [total // num_turns + (i < total % num_turns) for i in range(num_turns)]

  def build(n: int) -> str:
    return MF_HEADER + "\n".join(f"List {nm}: " + ", ".join(map(str, ls.first(k)))
                                 for nm, ls, k in zip(names, lists, sizes(n)))

  rate = max(1.0, count_tokens(", ".join(map(str, lists[0].first(64)))) / 64)
  n, context, _ = fit_length(build, length_tokens, count_tokens, guess=max(1, int(length_tokens / rate)),
                             max_n=num_turns * (max_value // 2), what=what)
  turns = []
  for nm, kind, ls, k in zip(names, kinds, lists, sizes(n)):
    xs = ls.first(k)
    ans = max(xs) if kind == "largest" else min(xs)
    turns.append(Turn(f"\nQuestion: What is the {kind} number in List {nm}?\nAnswer:", (str(ans),)))
  return context, turns, {"numbers_per_list": sizes(n), "kinds": kinds}


_MAKERS = {"kv": _kv, "prefix_suffix": _prefix_suffix, "vt": _vt, "mf": _mf}
