"""TTFT and decode ms/token of lcinfer against HF transformers, Llama-3-8B shape, batch 1, bf16.

Measured per context S (default 8192, 32768, 131072), both frameworks in one run, each in its own
subprocess, one after the other (JAX and torch never hold the GPU at the same time):
  TTFT      a full prefill of S fresh random tokens into an empty cache, logits of the last token
            included. lcinfer: `engine.prefill` with the LLM's prefill attention into a new cache of
            capacity S + decode tokens, timed to jax.block_until_ready; the first call (compile +
            one run) is reported apart. HF: `model(ids, use_cache=True, logits_to_keep=1)`, sdpa,
            timed to torch.cuda.synchronize after one warm-up call. Median of --runs timed runs
            (--runs-large for S >= --large-from), also as prefill tokens/s.
  decode    ms/token after that prefill, greedy. lcinfer: the compiled `generate.decode_loop`,
            --decode-reps calls of --decode-steps tokens each after a warm-up call that compiles it,
            median of (call time / steps). HF: one token per forward with the returned DynamicCache
            (what `generate` does), median of --hf-decode-steps timed steps after 2 warm-up steps.
Random weights (std 0.02, untied), Llama-3 RoPE (theta 5e5, llama3 scaling, factor 8).

On the GPU, from the repo root (an estimated 5-8 minutes on an H100; --time-budget-s kills a child that
runs long, keeping the cells it finished):
  PYTHONPATH=. python3 benchmarks/prefill_decode.py --out $OUT
writes benchmarks/results/prefill_decode-<device>.md and .json (copied to --out, where the
children's JSON and a log are also written as they go). On CPU, a tiny shape as an end-to-end check:
  PYTHONPATH=. python3 benchmarks/prefill_decode.py --tiny --results-dir /tmp/bench-results \\
      --jax-python PYTHON_WITH_JAX --torch-python PYTHON_WITH_TORCH
"""

from __future__ import annotations

import argparse, datetime, gc, json, os, platform, re, shlex, shutil, statistics  # noqa: E401
import subprocess, sys, tempfile, threading, time  # noqa: E401
from pathlib import Path

ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128)
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64)
COMMON = {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
          "tie_word_embeddings": False, "rope_parameters": ROPE, "initializer_range": 0.02}
WARM_STEPS = 2  # untimed decode steps before the timed ones (for lcinfer, the call that compiles)

def log(tag: str, msg: str) -> None:
  print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

def ms(x: float) -> float:
  return round(x * 1e3, 3)

def write_json(path: Path, obj) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(path)

def short_error(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}".strip()
  return ("OOM: " + text if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else text)[:600]

def run_contexts(tag: str, spec: dict, res: dict, out_path: Path, prefill, decode, after_cell) -> None:
  """For each context: TTFT from `prefill(s, seed) -> (seconds, output)` (first call untimed), then
  `decode(s, cell, output)` on the last prefill's output. Errors are recorded per cell."""
  for s in spec["contexts"]:
    cell, out = {"context": s}, None
    res["cells"].append(cell)
    try:
      n = spec["runs_large"] if s >= spec["large_from"] else spec["runs"]
      first, out = prefill(s, 1000 * s)
      log(tag, f"S={s}: first prefill (compile / warm-up + run) {first:.2f} s")
      times = []
      for r in range(n):
        out = None  # free the previous cache before the next prefill allocates one
        dt, out = prefill(s, 1000 * s + r + 1)
        times.append(dt)
      med = statistics.median(times)
      cell.update(runs=n, ttft_ms=ms(med), ttft_runs_ms=[ms(t) for t in times], first_call_s=round(first, 3),
                  prefill_tok_s=round(s / med, 1))
      log(tag, f"S={s}: TTFT {ms(med):.1f} ms, median of {n} ({s / med:,.0f} tok/s)")
      write_json(out_path, res)
      try:
        decode(s, cell, out)
        log(tag, f"S={s}: decode {cell['decode_ms_per_tok']:.2f} ms/token")
      except Exception as e:  # noqa: BLE001
        cell["decode_error"] = short_error(e)
        log(tag, f"S={s}: decode failed: {cell['decode_error']}")
    except Exception as e:  # noqa: BLE001  (OOM included)
      cell["error"] = short_error(e)
      log(tag, f"S={s}: failed: {cell['error']}")
    out = None
    gc.collect()
    after_cell(cell)
    write_json(out_path, res)

# -- lcinfer child -------------------------------------------------------------------------------
def child_lcinfer(spec: dict, out_path: Path) -> None:
  import importlib.metadata as md
  import jax, jax.numpy as jnp, jaxlib, numpy as np  # noqa: E401
  import lcinfer
  from lcinfer import engine
  from lcinfer.engine import core
  from lcinfer.engine.generate import MAX_STOP_IDS, GenState, decode_loop
  from lcinfer.engine.sampling import GREEDY

  dev = jax.devices()[0]
  plugins = sorted({f"{d.metadata['Name']} {d.version}" for d in md.distributions()  # jax-cuda13-plugin, -pjrt
                    if re.match(r"jax[-_]cuda", d.metadata["Name"] or "")})
  res = {"framework": "lcinfer", "python": platform.python_version(), "jax": jax.__version__,
         "jaxlib": jaxlib.__version__, "cuda_plugin": ", ".join(plugins) or None, "device": dev.device_kind,
         "platform": f"{dev.platform} {getattr(dev.client, 'platform_version', '')}".strip(), "cells": [],
         "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_"))}}
  config = lcinfer.ModelConfig.from_hf(spec["config"])
  t0 = time.perf_counter()
  llm = lcinfer.LLM.random(config, dtype="bfloat16", seed=0)
  jax.block_until_ready(llm.params)
  res.update(init_s=round(time.perf_counter() - t0, 2), params=config.num_params(),
             attention={"prefill": llm.prefill_attention.name, "decode": llm.decode_attention.name})
  log("lcinfer", f"{dev.device_kind}: {res['params'] / 1e6:,.0f}M params in {res['init_s']} s; attention "
      f"auto -> prefill {res['attention']['prefill']}, decode {res['attention']['decode']}")
  write_json(out_path, res)
  gd, params = llm.graphdef, llm.params
  steps, reps = spec["decode_steps"], spec["decode_reps"]
  total_new = WARM_STEPS + steps * reps
  stops = jnp.full((MAX_STOP_IDS,), -1, jnp.int32)  # no stop token: always decode total_new tokens
  traces = dict(core.TRACES)

  def prefill(s, seed):
    toks = np.random.default_rng(seed).integers(0, config.vocab_size, (1, s), dtype=np.int32)
    cache = jax.block_until_ready(llm.init_cache(1, -(-(s + total_new) // 128) * 128))  # as generate() rounds
    t = time.perf_counter()
    logits, cache = engine.prefill(gd, params, toks, np.array([s], np.int32), cache,
                                   attention=llm.prefill_attention)
    jax.block_until_ready((logits, cache))
    return time.perf_counter() - t, (logits, cache)

  def run_loop(state, stop_step):
    t = time.perf_counter()
    state = decode_loop(gd, params, state, stops, jnp.int32(total_new), jnp.int32(stop_step),
                        attention=llm.decode_attention, sampling=GREEDY)
    return time.perf_counter() - t, jax.block_until_ready(state)

  def decode(s, cell, out):
    logits, cache = out
    state = GenState(cache=cache, tokens=jnp.full((1, total_new), -1, jnp.int32),
                     last=jnp.argmax(logits, axis=-1).astype(jnp.int32), step=jnp.int32(0),
                     done=jnp.zeros((1,), bool), rng=jax.random.key(0))
    del out, logits, cache  # the cache is donated with the state
    first, state = run_loop(state, WARM_STEPS)
    per_tok = []
    for r in range(reps):
      dt, state = run_loop(state, WARM_STEPS + (r + 1) * steps)
      per_tok.append(dt / steps)
    if int(state.step) != total_new:
      raise RuntimeError(f"decode loop stopped at step {int(state.step)}, expected {total_new}")
    med = statistics.median(per_tok)
    cell.update(decode_ms_per_tok=ms(med), decode_runs_ms=[ms(t) for t in per_tok], decode_steps=steps,
                decode_first_call_s=round(first, 3), decode_compile_s=round(first - WARM_STEPS * med, 3))

  def after_cell(cell):
    if "first_call_s" in cell:
      cell["compile_s"] = round(cell["first_call_s"] - cell["ttft_ms"] / 1e3, 3)
    # compiles during this context: expected prefill_step 1, decode_loop 1 (more = a retrace)
    cell["traces"] = {k: v - traces.get(k, 0) for k, v in core.TRACES.items() if v != traces.get(k, 0)}
    traces.update(core.TRACES)
    peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    if peak:
      cell["peak_gib_process"] = round(peak / 2**30, 2)

  run_contexts("lcinfer", spec, res, out_path, prefill, decode, after_cell)

# -- HF transformers child -----------------------------------------------------------------------
def child_hf(spec: dict, out_path: Path) -> None:
  import torch, transformers  # noqa: E401
  from transformers import LlamaConfig, LlamaForCausalLM
  cuda = torch.cuda.is_available()
  dev = "cuda" if cuda else "cpu"
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  res = {"framework": "hf", "python": platform.python_version(), "torch": torch.__version__,
         "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
         "transformers": transformers.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
         "sdpa_enabled": {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in
                          ("flash", "cudnn", "mem_efficient")}, "cells": []}
  cfg = {k: v for k, v in spec["config"].items() if k != "model_type"}
  t0 = time.perf_counter()
  torch.manual_seed(0)
  torch.set_default_dtype(torch.bfloat16)  # weights made in bf16 directly on the device: no fp32 copy
  with torch.device(dev):
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
  model.eval()
  sync()
  res.update(init_s=round(time.perf_counter() - t0, 2), attn_implementation=model.config._attn_implementation,
             params=sum(p.numel() for p in model.parameters()))
  log("hf", f"{res['device']}: {res['params'] / 1e6:,.0f}M params in {res['init_s']} s; transformers "
      f"{transformers.__version__}, torch {torch.__version__}, attn {res['attn_implementation']}")
  write_json(out_path, res)
  n_dec = spec["hf_decode_steps"]

  def prefill(s, seed):
    ids = torch.randint(0, cfg["vocab_size"], (1, s), generator=torch.Generator().manual_seed(seed)).to(dev)
    sync()
    t = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    sync()
    return time.perf_counter() - t, out

  def decode(s, cell, out):
    pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    del out
    per_step = []
    for i in range(WARM_STEPS + n_dec):
      sync()
      t = time.perf_counter()
      o = model(nxt, past_key_values=pkv, use_cache=True, logits_to_keep=1)
      nxt = o.logits[:, -1].argmax(-1, keepdim=True)
      sync()
      if i >= WARM_STEPS:
        per_step.append(time.perf_counter() - t)
      pkv, o = o.past_key_values, None
    if pkv.get_seq_length() != s + WARM_STEPS + n_dec:
      raise RuntimeError(f"cache holds {pkv.get_seq_length()} tokens, expected {s + WARM_STEPS + n_dec}")
    cell.update(decode_ms_per_tok=ms(statistics.median(per_step)), decode_runs_ms=[ms(t) for t in per_step],
                decode_steps=n_dec)

  def after_cell(cell):
    if cuda:
      cell["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()

  with torch.inference_mode():
    run_contexts("hf", spec, res, out_path, prefill, decode, after_cell)

# -- parent --------------------------------------------------------------------------------------
def floors(cfg: dict, s: int) -> tuple[float, float]:
  """(prefill FLOP, decode bytes/token) at context s: the matmul weights once per token + causal
  attention 2*L*H*D*S^2 + one token of logits; decode reads the bf16 weights (bar the embedding) + KV."""
  e, f, h, k, d, v, nl = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                          cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"], cfg["num_hidden_layers"])
  per_layer = e * (h + 2 * k) * d + h * d * e + 3 * e * f
  return (2 * nl * per_layer * s + 2 * nl * h * d * s * s + 2 * e * v,
          2 * (nl * per_layer + v * e) + s * 2 * nl * k * d * 2)

def run_child(kind: str, python: str, spec_path: Path, out_path: Path, timeout: float | None, logf) -> str | None:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH"))
                                      if p)
  if kind == "lcinfer":  # allocate on demand (up to 92%); the torch child starts after this one exits
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  cmd = [python, "-u", str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path),
         "--child-out", str(out_path)]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
  killed = []
  timer = threading.Timer(timeout or 1e9, lambda: (killed.append(1), proc.kill()))
  timer.start()
  for line in proc.stdout:  # progress to the console and to the log
    for f in (sys.stdout, logf):
      f.write(line)
      f.flush()
  rc = proc.wait()
  timer.cancel()
  if killed:
    return f"{kind} child killed after {timeout:.0f} s (--time-budget-s); cells it had not finished are missing"
  return None if rc == 0 else f"{kind} child exited with status {rc} (see the log)"

def fmt(c: dict | None, key: str, nd: int = 1) -> str:
  if c is None or c.get(key) is not None:
    return "not run" if c is None else f"{c[key]:,.{nd}f}"
  err = c.get("error") or (c.get("decode_error") if key.startswith("decode") else None)
  return ("OOM" if err.startswith("OOM") else "error") if err else "-"

def table(cfg: dict, contexts, lc: dict | None, hf: dict | None, extra: bool) -> list[str]:
  cols = ["context", "lcinfer TTFT ms", "HF TTFT ms", "TTFT ratio HF/lcinfer", "lcinfer decode ms/tok",
          "HF decode ms/tok", "decode speedup HF/lcinfer"]
  if extra:
    cols += ["lcinfer prefill tok/s", "HF prefill tok/s", "lcinfer prefill compile s", "lcinfer decode compile s",
             "TTFT floor ms @ 800-620 TFLOP/s", "decode floor ms/tok @ 3 TB/s"]
  rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  cells = [{c["context"]: c for c in r["cells"]} if r else {} for r in (lc, hf)]
  for s in contexts:
    a, b = cells[0].get(s), cells[1].get(s)
    ratio = [f"{y / x:.2f}x" if x and y else "-" for x, y in
             (((a or {}).get(k), (b or {}).get(k)) for k in ("ttft_ms", "decode_ms_per_tok"))]
    r = [f"{s:,}", fmt(a, "ttft_ms"), fmt(b, "ttft_ms"), ratio[0], fmt(a, "decode_ms_per_tok", 2),
         fmt(b, "decode_ms_per_tok", 2), ratio[1]]
    if extra:
      r += [fmt(a, "prefill_tok_s", 0), fmt(b, "prefill_tok_s", 0), fmt(a, "compile_s"),
            fmt(a, "decode_compile_s")]
      fl, by = floors(cfg, s)
      r += [f"{fl / 8e11:,.4g}-{fl / 6.2e11:,.4g}", f"{by / 3e9:.3g}"]
    rows.append("| " + " | ".join(r) + " |")
  return rows

def nvidia_smi(field: str) -> str | None:
  try:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30).stdout.strip().splitlines()
    return out[0].strip() if out else None
  except (OSError, subprocess.SubprocessError):
    return None

def markdown(meta: dict, cfg: dict, lc: dict | None, hf: dict | None) -> str:
  L = [f"# Prefill TTFT and decode: lcinfer vs HF transformers{' (TINY shape, CPU check)' if meta['tiny'] else ''}",
       "", f"- device: {meta['device']}" + (f" (driver {meta['driver']})" if meta["driver"] else ""),
       f"- date: {meta['date']}; command `{meta['command']}` (cwd `{meta['cwd']}`), {meta['wall_s']} s"]
  if lc:
    L.append(f"- lcinfer: jax {lc['jax']}, jaxlib {lc['jaxlib']}, plugin {lc['cuda_plugin']}, Python {lc['python']}, "
             f"{lc['device']} ({lc['platform']}); attention \"auto\" -> prefill "
             f"`{lc['attention']['prefill']}`, decode `{lc['attention']['decode']}`; env {lc['env']}")
  if hf:
    L.append(f"- HF: transformers {hf['transformers']}, torch {hf['torch']} (CUDA {hf['torch_cuda']}, cuDNN "
             f"{hf['cudnn']}), Python {hf['python']}, {hf['device']}, attn `{hf.get('attn_implementation')}`, "
             f"sdpa backends enabled {hf['sdpa_enabled']}")
  L += [f"- model (HF config): `{json.dumps(cfg)}`; random weights (std 0.02), bf16, batch 1",
        f"- TTFT: median of {meta['runs']} runs ({meta['runs_large']} for S >= {meta['large_from']}) after the first "
        "call; lcinfer compile s = first call - median. Decode: lcinfer decode_loop "
        f"{meta['decode_reps']} x {meta['decode_steps']} tokens, HF {meta['hf_decode_steps']} single-token "
        "forwards (median per step). Ratios above 1: lcinfer is faster.", ""]
  L += table(cfg, meta["contexts"], lc, hf, extra=True)
  notes = [f"{fw} S={c['context']}: {c.get('error') or c.get('decode_error')}"
           for fw, r in (("lcinfer", lc), ("HF", hf)) for c in (r or {}).get("cells", [])
           if c.get("error") or c.get("decode_error")] + meta["child_problems"]
  if notes:
    L += ["", "Errors:"] + [f"- {n}" for n in notes]
  L += ["", "Floors for the 8B shape on an H100 (BENCHMARKS.md): prefill at 32K ~8.1e14 FLOP (~1.0-1.3 s at "
        "620-800 TFLOP/s); decode ~20 GB read per token (~6.8 ms at ~3 TB/s). HF anchors there: TTFT 263 / 1404 ms, "
        "decode 88.6 / 82.5 ms/token at 8K / 32K. The floor columns above are computed for this shape: "
        "prefill = matmul weights once per token + causal attention 2*L*H*D*S^2 + one token of logits; decode = "
        "bf16 weights (bar the embedding) + KV bytes read per token."]
  return "\n".join(L + ["", "Per-run times, peak memory and compile counts: the .json next to this file.", ""])

def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tiny", action="store_true", help="tiny model and contexts (CPU end-to-end check)")
  ap.add_argument("--contexts", help="comma-separated prompt lengths (default 8192,32768,131072; tiny 256,512)")
  ap.add_argument("--runs", type=int, default=5, help="timed prefills per context")
  ap.add_argument("--runs-large", type=int, default=3, help="timed prefills for contexts >= --large-from")
  ap.add_argument("--large-from", type=int, help="default 65536 (tiny: 512)")
  ap.add_argument("--decode-steps", type=int, help="lcinfer tokens per timed decode_loop call (64; tiny 16)")
  ap.add_argument("--decode-reps", type=int, default=3, help="lcinfer timed decode_loop calls")
  ap.add_argument("--hf-decode-steps", type=int, help="HF timed single-token steps (32; tiny 8)")
  for fw in ("hf", "lcinfer"):
    ap.add_argument(f"--skip-{fw}", action="store_true")
  ap.add_argument("--jax-python", default=sys.executable, help="interpreter for the lcinfer (JAX) child")
  ap.add_argument("--torch-python", default=sys.executable, help="interpreter for the HF (torch) child")
  ap.add_argument("--time-budget-s", type=float, default=540, help="wall time for both children; 0: no limit")
  ap.add_argument("--hf-reserve-s", type=float, default=150, help="of the budget, kept for the HF child")
  ap.add_argument("--results-dir", help="default benchmarks/results (tiny: $TMPDIR/lcinfer-bench)")
  ap.add_argument("--out", help="copy the results here; the children's JSON and the log are written here")
  for hidden in ("--child", "--spec", "--child-out"):  # how the parent starts a child
    ap.add_argument(hidden, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    (child_lcinfer if a.child == "lcinfer" else child_hf)(json.loads(Path(a.spec).read_text()), Path(a.child_out))
    return

  contexts = sorted(int(x) for x in (a.contexts or ("256,512" if a.tiny else "8192,32768,131072")).split(","))
  cfg = {"model_type": "llama", **(TINY if a.tiny else LLAMA3_8B), **COMMON}
  spec = {"config": cfg, "contexts": contexts, "runs": a.runs, "runs_large": a.runs_large,
          "large_from": a.large_from or (512 if a.tiny else 65536), "decode_steps": a.decode_steps or
          (16 if a.tiny else 64), "decode_reps": a.decode_reps, "hf_decode_steps": a.hf_decode_steps or
          (8 if a.tiny else 32)}
  default_dir = Path(tempfile.gettempdir()) / "lcinfer-bench" if a.tiny else Path(__file__).resolve().parent / "results"
  results_dir = Path(a.results_dir) if a.results_dir else default_dir
  work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="prefill_decode-"))
  for p in (results_dir, work):
    p.mkdir(parents=True, exist_ok=True)
  spec_path = work / "prefill_decode.spec.json"
  write_json(spec_path, spec)
  pp = os.environ.get("PYTHONPATH")
  meta = {**{k: v for k, v in spec.items() if k != "config"}, "tiny": a.tiny, "gpu": nvidia_smi("name"),
          "driver": nvidia_smi("driver_version"), "cwd": os.getcwd(), "child_problems": [],
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": (f"PYTHONPATH={shlex.quote(pp)} " if pp else "") + shlex.join([sys.executable, *sys.argv])}
  t_start, results = time.monotonic(), {"lcinfer": None, "hf": None}
  with open(work / "prefill_decode.log", "w") as logf:
    for kind, python, skip in (("lcinfer", a.jax_python, a.skip_lcinfer), ("hf", a.torch_python, a.skip_hf)):
      if skip:
        continue
      left = a.time_budget_s - (time.monotonic() - t_start) if a.time_budget_s else None
      timeout = left and max(30.0, left - (a.hf_reserve_s if kind == "lcinfer" and not a.skip_hf else 0))
      out_path = work / f"prefill_decode.{kind}.json"
      out_path.unlink(missing_ok=True)
      if problem := run_child(kind, python, spec_path, out_path, timeout, logf):
        meta["child_problems"].append(problem)
      results[kind] = json.loads(out_path.read_text()) if out_path.exists() else None
  meta["wall_s"] = round(time.monotonic() - t_start, 1)
  lc, hf = results["lcinfer"], results["hf"]
  meta["device"] = meta["gpu"] or (hf or {}).get("device") or (lc or {}).get("device") or "unknown"
  name = f"prefill_decode-{re.sub(r'[^a-z0-9]+', '-', meta['device'].lower()).strip('-')}{'-tiny' * a.tiny}"
  md, js = results_dir / f"{name}.md", results_dir / f"{name}.json"
  md.write_text(markdown(meta, cfg, lc, hf))
  write_json(js, {"meta": meta, "config": cfg, "lcinfer": lc, "hf": hf})
  if a.out and work.resolve() != results_dir.resolve():
    for f in (md, js):
      shutil.copy(f, work / f.name)
  print(f"\nwrote {md} and {js}" + (f" (copied to {a.out})" if a.out else "") + f"; {meta['wall_s']} s in all")
  print("".join(f"problem: {p}\n" for p in meta["child_problems"]) + f"\n{meta['device']}: lcinfer attention "
        f"{(lc or {}).get('attention')}, HF {(hf or {}).get('attn_implementation')}")
  print("\n".join(table(cfg, contexts, lc, hf, extra=False)), flush=True)

if __name__ == "__main__":
  main()
