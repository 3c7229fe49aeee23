"""The task registry with every built-in task registered.

    from lcinfer.eval import tasks
    s = tasks.make_sample("niah_single", 4096, depth=0.5, seed=0, count_tokens=token_counter(tok))
    s.prompt, s.answers, s.target, s.meta["needles"][0]["token_depth"]
    tasks.score(s, model_output)   # in [0, 1]

Tasks (RULER, Hsieh et al. 2024; NIAH, Kamradt 2023): niah_single, niah_multikey, niah_multivalue,
niah_multiquery, vt (niah.py); cwe, fwe (aggregation.py); kv_uuid (kv.py). Adding one: a
function decorated with `base.register(name, description)` in a module imported below.
"""

from lcinfer.eval import aggregation as _aggregation  # noqa: F401  (registers cwe, fwe)
from lcinfer.eval import kv as _kv  # noqa: F401  (registers kv_uuid)
from lcinfer.eval import niah as _niah  # noqa: F401  (registers niah_*, vt)
from lcinfer.eval.base import (TASKS, Sample, TaskSpec, available_tasks, contains, get_task, make_sample, register,
                               score, string_match_all)

__all__ = ["TASKS", "Sample", "TaskSpec", "available_tasks", "contains", "get_task", "make_sample", "register",
           "score", "string_match_all"]
