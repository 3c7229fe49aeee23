"""Plain text for training a tokenizer (or warming up a small model): haystack prose and short
samples of every task and SCBench session, prompts with their answers, so that every format a
task produces (magic-number needles, UUIDs, VAR statements, numbered and coded word lists,
questions) is in it.
"""

from __future__ import annotations

import random

from lcinfer.errors import ConfigError
from lcinfer.eval import words
from lcinfer.eval.base import available_tasks, make_sample
from lcinfer.eval.haystack import as_rng
from lcinfer.eval.scbench import SESSION_TASKS, make_session, session_prompts


def _wrap(text: str, width: int) -> list[str]:
  """Lines of at most `width` characters, broken at spaces (sentencepiece skips lines over ~4 KB)."""
  out = []
  for para in text.split("\n"):
    while len(para) > width:
      cut = para.rfind(" ", 0, width)
      cut = width if cut <= 0 else cut
      out.append(para[:cut])
      para = para[cut:].lstrip(" ")
    out.append(para)
  return out


def training_corpus(n_chars: int, seed: int | random.Random = 0, line_width: int = 1000) -> str:
  """`n_chars` characters of text, deterministic in `seed`, one paragraph or sample per block, lines at
  most `line_width` characters (broken at spaces)."""
  if isinstance(n_chars, bool) or not isinstance(n_chars, int) or n_chars <= 0:
    raise ConfigError(f"n_chars must be a positive int, got {n_chars!r}")
  rng = as_rng(seed, "corpus")
  tasks = available_tasks()
  blocks, total, i = [], 0, 0
  while total < n_chars:
    kind = i % (len(tasks) + 2)
    length = rng.randrange(100, 400)  # whitespace words
    if kind < len(tasks):
      s = make_sample(tasks[kind], length, seed=rng.getrandbits(32))
      text = s.prompt + s.target
    elif kind == len(tasks):
      sess = make_session(SESSION_TASKS[(i // (len(tasks) + 2)) % len(SESSION_TASKS)], length, num_turns=3,
                          seed=rng.getrandbits(32))
      text = session_prompts(sess)[-1] + sess.turns[-1].target
    else:
      text = " ".join(words.prose_sentence(rng) for _ in range(length // 10))
    block = "\n".join(_wrap(text, line_width)) + "\n\n"
    blocks.append(block)
    total += len(block)
    i += 1
  return "".join(blocks)[:n_chars]
