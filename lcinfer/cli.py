"""The `lcinfer` command: convert, export, generate, demo."""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_convert(a) -> int:
  from lcinfer.checkpoint import convert

  t0 = time.perf_counter()
  out = convert(a.hf_dir, a.out_dir, dtype=a.dtype, force=a.force)
  print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
  return 0


def _cmd_export(a) -> int:
  from lcinfer.checkpoint import export

  out = export(a.ckpt_dir, a.hf_dir, force=a.force)
  print(f"wrote {out}")
  return 0


def _cmd_generate(a) -> int:
  import numpy as np

  import lcinfer

  llm = lcinfer.load(a.model, dtype=a.dtype, attention=a.attention)
  if a.prompt_ids:
    prompt = np.asarray([int(x) for x in a.prompt_ids.split(",")], np.int32)
  elif a.chat:
    if llm.tokenizer is None:
      raise lcinfer.ConfigError(f"{a.model} has no tokenizer; use --prompt-ids")
    prompt = np.asarray(llm.tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=True))
  else:
    prompt = a.prompt
  stop = None if a.stop is None else [int(x) for x in a.stop.split(",") if x]
  tok = llm.tokenizer
  chunk = a.chunk_size if a.chunk_size and a.chunk_size > 0 else None
  new: list[int] = []
  printed = ""
  t0 = time.perf_counter()
  for piece in llm.stream(prompt, max_new_tokens=a.max_new_tokens, sampling=a.sampling, stop=stop, seed=a.seed,
                          chunk_size=chunk, capacity=a.capacity, progress=True):
    new.extend(int(t) for t in piece[0] if t >= 0)
    if tok is not None and not a.ids:
      text = tok.decode(new)
      sys.stdout.write(text[len(printed):])
      printed = text
    else:
      sys.stdout.write(" ".join(str(int(t)) for t in piece[0] if t >= 0) + " ")
    sys.stdout.flush()
  dt = time.perf_counter() - t0
  print(f"\n[{len(new)} tokens in {dt:.2f}s]", file=sys.stderr)
  return 0


def _cmd_eval(a) -> int:
  from pathlib import Path

  import lcinfer
  from lcinfer.eval import runner

  specs = [runner.EvalSpec(task=t, lengths=tuple(runner.parse_lengths(a.lengths)),
                           depths=tuple(runner.depths_grid(a.depths)), methods=tuple(a.attention.split(",")),
                           kv_press=a.kv_press, samples=a.samples, seed=a.seed, max_new_tokens=a.max_new_tokens)
           for t in a.task.split(",")]  # all names are checked before the model loads
  out = Path(a.out)
  runner.check_output_dir(out)
  from lcinfer.demo import shipped_model_path

  llm = lcinfer.load(a.model or shipped_model_path(), dtype=a.dtype)
  results = [runner.run_grid(llm, spec) for spec in specs]
  paths = runner.write_results(results, out)
  for r in results:
    print(f"\n{r['task']}:\n{runner.format_table(r)}")
  print(f"\nwrote {', '.join(p.name for p in paths)} to {out}")
  return 0


def _cmd_demo(a) -> int:
  from lcinfer.demo import run_demo

  return run_demo(out_dir=a.out, lengths=a.lengths, depths=a.depths)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="lcinfer", description="Long-context LLM inference research in JAX.")
  sub = p.add_subparsers(dest="cmd", required=True)

  c = sub.add_parser("convert", help="HF safetensors directory -> lcinfer (orbax) checkpoint")
  c.add_argument("hf_dir")
  c.add_argument("out_dir")
  c.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                 help="parameter dtype (default: the checkpoint's own)")
  c.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
  c.set_defaults(fn=_cmd_convert)

  e = sub.add_parser("export", help="lcinfer checkpoint -> HF safetensors directory")
  e.add_argument("ckpt_dir")
  e.add_argument("hf_dir")
  e.add_argument("--force", action="store_true", help="replace HF_DIR if it exists")
  e.set_defaults(fn=_cmd_export)

  g = sub.add_parser("generate", help="generate a continuation, streamed to stdout")
  g.add_argument("model", help="converted checkpoint or HF directory")
  g.add_argument("--prompt", default="", help="prompt text")
  g.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of text")
  g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
  g.add_argument("--max-new-tokens", type=int, default=64)
  g.add_argument("--sampling", default="greedy", help="greedy | temperature=0.7,top_k=50,top_p=0.9")
  g.add_argument("--stop", default=None, help="comma-separated stop token ids (default: EOS; '' = none)")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
  g.add_argument("--attention", default="auto")
  g.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk (progress bar); 0 = one pass")
  g.add_argument("--capacity", type=int, default=None, help="KV cache slots (default: prompt + new tokens)")
  g.add_argument("--ids", action="store_true", help="print token ids instead of text")
  g.set_defaults(fn=_cmd_generate)

  v = sub.add_parser("eval", help="synthetic long-context tasks over a length x depth grid, with heatmaps")
  v.add_argument("task", help="task name(s), comma-separated (e.g. niah_single,vt)")
  v.add_argument("--model", default=None, help="checkpoint with tokenizer files (default: the shipped model)")
  v.add_argument("--lengths", default="1k,2k,4k", help="context lengths in tokens, e.g. 1k,2k,4k,8k")
  v.add_argument("--depths", type=int, default=5, help="number of needle depths from 0%% to 100%%")
  v.add_argument("--attention", default="auto", help="attention method(s), comma-separated, compared")
  v.add_argument("--kv-press", default="none", help="KV-cache press")
  v.add_argument("--samples", type=int, default=1, help="samples per cell")
  v.add_argument("--seed", type=int, default=0)
  v.add_argument("--max-new-tokens", type=int, default=None)
  v.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
  v.add_argument("--out", default="lcinfer-eval", help="output directory (results-TASKS.json, summary-TASKS.md, PNGs)")
  v.set_defaults(fn=_cmd_eval)

  d = sub.add_parser("demo", help="the default job: a short end-to-end run on CPU")
  d.add_argument("--out", default="lcinfer-demo", help="output directory")
  d.add_argument("--lengths", default="1k,2k,4k", help="context lengths of the NIAH grid")
  d.add_argument("--depths", type=int, default=5, help="needle depths per length")
  d.set_defaults(fn=_cmd_demo)
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from lcinfer.errors import LcinferError

  try:
    return args.fn(args)
  except (LcinferError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
