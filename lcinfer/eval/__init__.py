"""Synthetic long-context tasks: RULER (Hsieh et al. 2024) and NIAH (Kamradt 2023) generators,
SCBench (Li et al. 2024) shared-context sessions, and their string-match scores.

    from lcinfer import eval as lce
    count = lce.token_counter(llm.tokenizer)                   # or lce.whitespace_count
    s = lce.make_sample("niah_single", 4096, depth=0.5, seed=0, count_tokens=count)
    out = llm.generate(s.prompt, max_new_tokens=16).texts[0]
    lce.score(s, out)                                          # 1.0 if the magic number is in `out`
    sess = lce.make_session("kv", 8192, num_turns=4, protocol="multi_turn", count_tokens=count)
    prompts = lce.session_prompts(sess)

Every text is generated from the seed (or from text you pass, `Haystack.from_text`); lengths are
in tokens of the given counter: a prompt has at most `length_tokens` tokens and at least
`length_tokens - max(16, 2%)`. `sample.target` (" answer1, answer2") is the training completion.
"""

from lcinfer.eval.base import TASKS, Sample, TaskSpec, available_tasks, get_task, make_sample, score
from lcinfer.eval import tasks as _tasks  # noqa: F401  (registers the built-in tasks)
from lcinfer.eval.corpus import training_corpus
from lcinfer.eval.haystack import Haystack, token_counter, tolerance, whitespace_count
from lcinfer.eval.scbench import (PROTOCOLS, SESSION_TASKS, Session, Turn, make_session, score_session,
                                  session_prompts)

__all__ = ["TASKS", "Sample", "TaskSpec", "available_tasks", "get_task", "make_sample", "score", "training_corpus",
           "Haystack", "token_counter", "tolerance", "whitespace_count", "PROTOCOLS", "SESSION_TASKS", "Session",
           "Turn", "make_session", "score_session", "session_prompts"]
