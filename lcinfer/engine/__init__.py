"""Prefill, decode, sampling and the generate loop: pure functions of (graphdef, params, cache)."""

from lcinfer.engine.core import (TRACES, decode_step, forward_logits, pad_prompts, positions_for, prefill,
                                 prefill_step)
from lcinfer.engine.generate import GenState, Generation, decode_loop, generate, stream
from lcinfer.engine.sampling import GREEDY, Sampling, sample

__all__ = ["TRACES", "decode_step", "forward_logits", "pad_prompts", "positions_for", "prefill", "prefill_step",
           "GenState", "Generation", "decode_loop", "generate", "stream", "GREEDY", "Sampling", "sample"]
