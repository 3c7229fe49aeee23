"""Samples, the task registry, and string-match scoring.

A task is a generator `make(length_tokens, depth, seed, count_tokens, **options) -> Sample` plus a
`score(sample, output) -> float`, registered by name. The prompt is `sample.context +
sample.question`; the context (the long part) does not depend on the question, so it can be
prefilled and cached once. `sample.target` is the canonical completion for training: a space and
the answers joined by ", ".
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import random
import re
from typing import Any, Callable

from lcinfer.errors import ConfigError
from lcinfer.eval.haystack import CountTokens, whitespace_count


@dataclasses.dataclass(frozen=True)
class Sample:
  """One long-context example. `meta` holds what was generated: depth actually used, needle token
  offsets, token counts (`context_tokens`, `prompt_tokens`), options. It is JSON-serialisable."""

  context: str
  question: str
  answers: tuple[str, ...]
  task: str
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def prompt(self) -> str:
    return self.context + self.question

  @property
  def target(self) -> str:
    """The completion a model is trained to produce (append EOS yourself): " a, b, c"."""
    return format_target(self.answers)

  def to_dict(self) -> dict:
    return {"task": self.task, "context": self.context, "question": self.question,
            "answers": list(self.answers), "meta": self.meta}

  @staticmethod
  def from_dict(d: dict) -> "Sample":
    return Sample(context=d["context"], question=d["question"], answers=tuple(d["answers"]), task=d["task"],
                  meta=dict(d.get("meta", {})))


def format_target(answers) -> str:
  return " " + ", ".join(answers)


def contains(output: str, answer: str, whole_word: bool = True) -> bool:
  """Case-insensitive match of `answer` in `output` (RULER's string match). With `whole_word`, the
  answer may not be glued to letters or digits on either side ("123" is not in "41235")."""
  if not whole_word:
    return answer.lower() in output.lower()
  pat = r"(?<![0-9A-Za-z])" + re.escape(answer) + r"(?![0-9A-Za-z])"
  return re.search(pat, output, flags=re.IGNORECASE) is not None


def string_match_all(answers, output: str, whole_word: bool = True) -> float:
  """RULER's `string_match_all`: the fraction of the expected answers found in the output."""
  answers = list(answers)
  if not answers:
    raise ValueError("a sample needs at least one answer to score")
  return sum(contains(output, a, whole_word) for a in answers) / len(answers)


def score_sample(sample: Sample, output: str, whole_word: bool = True) -> float:
  return string_match_all(sample.answers, output, whole_word)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registered task: its generator, scorer, the options `make` takes (with defaults), and whether
  `depth` means anything for it (aggregation tasks have no needle and ignore it)."""

  name: str
  make: Callable[..., Sample]
  score: Callable[..., float]
  description: str
  uses_depth: bool
  options: dict = dataclasses.field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {}


def register(name: str, description: str, *, uses_depth: bool = True, score=score_sample):
  """Decorator: register `fn(length_tokens, depth, seed, count_tokens, *, **options) -> Sample`. The
  registered `TaskSpec.make` checks the arguments and options (keyword-only parameters of `fn`)."""
  def deco(fn):
    if name in TASKS:
      raise ValueError(f"task {name!r} is already registered")
    opts = {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY}

    def make(length_tokens: int, depth: float | None = None, seed: int | random.Random = 0,
             count_tokens: CountTokens = whitespace_count, **options: Any) -> Sample:
      bad = sorted(set(options) - set(opts))
      if bad:
        valid = ", ".join(f"{k}={v!r}" for k, v in opts.items()) or "none"
        raise ConfigError(f"task {name!r} has no option(s) {', '.join(bad)}; its options (defaults): {valid}")
      check_common(length_tokens, depth)
      return fn(length_tokens, depth, seed, count_tokens, **options)

    functools.update_wrapper(make, fn)
    TASKS[name] = TaskSpec(name, make, score, description, uses_depth, opts)
    return fn
  return deco


def available_tasks() -> tuple[str, ...]:
  return tuple(sorted(TASKS))


def get_task(name: str) -> TaskSpec:
  if name not in TASKS:
    raise ConfigError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
  return TASKS[name]


def check_common(length_tokens, depth) -> None:
  if isinstance(length_tokens, bool) or not isinstance(length_tokens, int) or length_tokens <= 0:
    raise ConfigError(f"length_tokens must be a positive int, got {length_tokens!r}")
  if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int | float) or not 0 <= depth <= 1):
    raise ConfigError(f"depth must be None (random) or a number in [0, 1] (0 = start, 1 = end), got {depth!r}")


def make_sample(name: str, length_tokens: int, depth: float | None = None, seed: int | random.Random = 0,
                count_tokens: CountTokens = whitespace_count, **options: Any) -> Sample:
  """Generate one sample of task `name` whose prompt (context + question) has at most `length_tokens`
  tokens and at least `length_tokens - tolerance(length_tokens)` (2% or 16 tokens).

  depth: where the needle goes, 0 = start of the context, 1 = end; None draws it from the seed.
  seed: an int or a `random.Random` (advanced in place). count_tokens: see `token_counter`.
  """
  return get_task(name).make(length_tokens, depth, seed, count_tokens, **options)


def score(sample: Sample, output: str, whole_word: bool = True) -> float:
  """The task's metric for a model's `output` (the generated text after the prompt), in [0, 1]."""
  return get_task(sample.task).score(sample, output, whole_word)
