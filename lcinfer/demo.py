"""`lcinfer demo`: an end-to-end run on CPU in well under a minute.

Until the small retrieval model ships (issue 3), the demo uses a tiny randomly initialised
Llama-3-style model: it writes it as an HF directory, converts it, loads both, checks that they
give identical logits and that cached decoding matches a full forward pass, generates with and
without the cache, and prints a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def _tiny_config_dict() -> dict:
  return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 128,
          "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
          "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 512},
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def run_demo(out_dir: str = "lcinfer-demo") -> int:
  import jax

  import lcinfer
  from lcinfer.checkpoint import convert
  from lcinfer.checkpoint import params as P
  from lcinfer.checkpoint.safetensors_io import write_safetensors
  from lcinfer.checkpoint.convert import atomic_output_dir

  out = Path(out_dir).absolute()
  print(f"lcinfer {lcinfer.__version__} on {jax.devices()[0].platform}; writing to {out}")
  rows = []
  cfg_d = _tiny_config_dict()
  config = lcinfer.ModelConfig.from_hf(cfg_d)
  llm = lcinfer.LLM.random(config, dtype="float32", seed=0)
  hf_dir, ck_dir = out / "tiny-hf", out / "tiny-lcinfer"
  t0 = time.perf_counter()
  with atomic_output_dir(hf_dir, force=True) as tmp:
    write_safetensors(P.state_to_arrays(llm.params), tmp)
    (tmp / "config.json").write_text(json.dumps(cfg_d, indent=2))
  convert(hf_dir, ck_dir, force=True)
  rows.append(("write HF dir + convert", f"{time.perf_counter() - t0:.2f} s"))

  a = lcinfer.load(hf_dir, dtype="float32")
  b = lcinfer.load(ck_dir, dtype="float32")
  ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 96)).astype(np.int32)
  t0 = time.perf_counter()
  la = a.logits(ids)
  rows.append(("full forward [2, 96] (incl. compile)", f"{time.perf_counter() - t0:.2f} s"))
  lb = b.logits(ids)
  rows.append(("max |logits(HF dir) - logits(converted)|", f"{np.abs(la - lb).max():.1e}"))

  from lcinfer import engine
  cache = a.init_cache(2, 128)
  lg, cache = engine.prefill(a.graphdef, a.params, ids[:, :64], np.array([64, 64]), cache,
                             attention=a.prefill_attention, chunk_size=16)
  err = [np.abs(np.asarray(lg) - la[:, 63]).max()]
  for t in range(64, 96):
    lg, cache = engine.decode_step(a.graphdef, a.params, jax.numpy.asarray(ids[:, t]), cache,
                                   attention=a.decode_attention)
    err.append(np.abs(np.asarray(lg) - la[:, t]).max())
  rows.append(("chunked prefill + 32 decode steps vs full forward", f"{max(err):.1e}"))

  t0 = time.perf_counter()
  gen = a.generate([ids[0, :40], ids[1, :57]], max_new_tokens=48, stop=[])
  dt = time.perf_counter() - t0
  rows.append(("generate 2 x 48 tokens, greedy (incl. compile)", f"{dt:.2f} s"))
  t0 = time.perf_counter()
  a.generate([ids[0, :40], ids[1, :57]], max_new_tokens=48, stop=[])
  dt = time.perf_counter() - t0
  rows.append(("generate again (compiled)", f"{dt * 1000 / 48:.2f} ms/token"))
  rows.append(("first new tokens of prompt 0", " ".join(map(str, gen.tokens[0][:8]))))

  w = max(len(r[0]) for r in rows)
  print()
  for k, v in rows:
    print(f"  {k:<{w}}  {v}")
  print("\n(a tiny random model: the trained retrieval model and the NIAH grid come with issue 3)")
  return 0
