"""lcinfer: long-context LLM inference research in JAX.

    import lcinfer
    llm = lcinfer.load("path/to/checkpoint", dtype="bfloat16")   # converted or HF directory
    logits = llm.logits(token_ids)                                  # [B, T, vocab] float32
    out = llm.generate(["Hello"], max_new_tokens=32)                # out.tokens, out.texts
"""

from lcinfer.api import LLM, GenerateOutput, load
from lcinfer.config import ModelConfig, RopeConfig
from lcinfer.engine.sampling import Sampling
from lcinfer.errors import CapacityError, CheckpointError, ConfigError, LcinferError, OutputExistsError

__version__ = "0.1.0"
__all__ = ["LLM", "GenerateOutput", "load", "ModelConfig", "RopeConfig", "Sampling", "CapacityError",
           "CheckpointError", "ConfigError", "LcinferError", "OutputExistsError"]
