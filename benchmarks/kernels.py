"""Kernel benchmarks (issue 4, ../shared/BENCHMARKS.md "kernels"): one run, every comparison side by side.

  * copy: a 2 GiB device copy, the bandwidth ceiling of the same run (read + write bytes / time);
  * dense: causal attention forward, bf16, B=1, H=32, D=128 at S = 8K/32K/128K: cuDNN
    (jax.nn.dot_product_attention), jax's deprecated Pallas Triton mha, lcinfer's Triton-lowered
    Pallas flash kernel, and lcinfer's default dense prefill path ("auto"). TFLOP/s = 2*B*H*S^2*D / t;
  * block_sparse: 10% of the causally visible KV blocks kept (the diagonal always) at 128K;
  * vertical_slash: BENCHMARKS.md's four (v, s) pattern sets at 128K (H=32, and GQA with 8 KV
    heads), index construction on device included in the time; speedup over cuDNN dense and
    efficiency = density x dense time / time, with the exact fraction of causal (q, k) pairs and
    with BENCHMARKS.md's density column (kernel_report.table_density, the one its MInference
    efficiencies use);
  * decode: one query per head over a 128K bf16 cache (B=1, H=32, K=8, D=128): lcinfer's
    flash-decoding kernel and the dense XLA decode, GB/s of K+V read and fraction of copy bandwidth;
  * --tune: block-size sweeps of the flash and flash-decoding kernels.

Timing: jit, compile measured apart, warm-up, median of --reps runs with block_until_ready.
Writes benchmarks/results/kernels-<device>.md and .json (or --out DIR).
Run on a GPU:  PYTHONPATH=. python3 benchmarks/kernels.py [--tune]
Smoke test of the plumbing on CPU (tiny shapes, Pallas interpret mode):  ... --smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lcinfer.pallas_kernels.block_sparse import block_sparse_attention
from lcinfer.pallas_kernels.diagonals import exact_vertical_slash_attention, split_isolated_slashes
from lcinfer.pallas_kernels.flash_triton import flash_attention
from lcinfer.pallas_kernels.flash_mgpu import block_sparse_attention_mgpu, flash_attention_mgpu
from lcinfer.pallas_kernels.sparse_index import blocks_from_mask, vertical_slash_to_layout
from lcinfer.pallas_kernels.vertical_slash import vertical_slash_to_ranges

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_report  # noqa: E402
from kernel_report import attempt, bench, bench_interleaved, device_info, markdown, rand  # noqa: E402
from kernels_decode import run_decode, run_quant_tune  # noqa: E402

VS_SETS = ((1000, 6096), (30, 800), (3500, 100), (100, 800))
MINFERENCE_MS = {(1000, 6096): 38.6, (30, 800): 15.6, (3500, 100): 34.5, (100, 800): 15.3}


# -- copy bandwidth ------------------------------------------------------------------------------
def copy_bandwidth(args) -> dict:
  n = (2 << 30) // 4 if not args.smoke else 1 << 20
  x = jax.random.uniform(jax.random.key(0), (n,), jnp.float32)
  r = bench(lambda x: x * 1.0001, x, reps=args.reps)
  return {**r, "GB/s": 2 * n * 4 / (r["ms"] * 1e-3) / 1e9}


# -- dense ---------------------------------------------------------------------------------------
def dense_impls(args, h, d):
  scale = d ** -0.5
  impls = {
      "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                            implementation="cudnn"),
      "cudnn_with_lse": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, scale=scale, is_causal=True, implementation="cudnn", return_residual=True),
      "jax_pallas_mha": lambda q, k, v: _mha(q, k, v, scale),
      "jax_mosaic_gpu_attention": lambda q, k, v: _mosaic_attention(q, k, v, scale),
      "lcinfer_flash": lambda q, k, v: flash_attention(q, k, v, scale=scale, causal=True,
                                                       interpret=args.smoke)[0],
      "lcinfer_flash_mgpu": lambda q, k, v: flash_attention_mgpu(q, k, v, scale=scale, causal=True)[0],
      "lcinfer_flash_mgpu_tiles_fastest": lambda q, k, v: flash_attention_mgpu(
          q, k, v, scale=scale, causal=True, heads_fastest=False)[0],
      "lcinfer_default": _default_dense(h, d, scale),
  }
  if args.smoke:
    impls = {k: v for k, v in impls.items() if k == "lcinfer_flash"}
  return impls


def _mha(q, k, v, scale):
  from jax.experimental.pallas.ops.gpu.attention import mha
  return mha(q, k, v, None, sm_scale=scale, causal=True)


def _mosaic_attention(q, k, v, scale):
  """jax's own Hopper (Mosaic GPU, wgmma, warp-specialized) attention example, as a reference for
  what that path reaches; it has no scale argument, so q is pre-scaled, and it runs in float16:
  the casts are extra elementwise ops inside the timed function (a few % at 8K, less beyond)."""
  from jax.experimental.pallas.ops.gpu import attention_mgpu as am
  cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
  f16 = jnp.float16  # the example's kernel is written for float16 (bf16 inputs fail to lower)
  return am.attention((q * scale).astype(f16), k.astype(f16), v.astype(f16), cfg)


def _default_dense(h, d, scale):
  """lcinfer's default prefill attention ("auto") for a model with these heads, called as a model
  layer calls it (need_lse=False: the layer drops lse)."""
  import lcinfer
  from lcinfer import attention

  cfg = lcinfer.ModelConfig.from_hf({"model_type": "llama", "hidden_size": h * d, "num_attention_heads": h,
                                     "num_key_value_heads": h, "head_dim": d, "num_hidden_layers": 1,
                                     "intermediate_size": 4 * h * d, "vocab_size": 256,
                                     "max_position_embeddings": 1 << 20})
  method = attention.resolve("auto", cfg, None, "prefill")

  def f(q, k, v):
    pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
    return method.prefill(q, k, v, q_pos_BT=pos, kv_pos_BS=pos, scale=scale, need_lse=False)[0]
  f.method = method.name
  return f


def run_dense(args, rows):
  b, h, d = 1, args.heads, 128
  for s in args.seqs:
    ks = jax.random.split(jax.random.key(s), 3)
    q, k, v = (rand(kk, (b, s, h, d)) for kk in ks)
    flops = 2 * b * h * s * s * d
    res = {}
    impls = dense_impls(args, h, d)
    timed = bench_interleaved(impls, q, k, v, reps=args.reps)  # same-run ratios: samples in turn
    for name, f in impls.items():
      label = f"{name} ({f.method})" if hasattr(f, "method") else name
      r = attempt(rows, f"dense {label} S={s}", lambda: timed[name])
      r.update(section="dense", impl=name, S=s)
      if "ms" in r:
        r["TFLOP/s"] = flops / (r["ms"] * 1e-3) / 1e12
        res[name] = r
    for r in res.values():
      if "cudnn" in res:
        r["x_cudnn"] = res["cudnn"]["ms"] / r["ms"]


def cudnn_dense(args, s, h, kh) -> dict:
  """The sparse sections' reference: {'ms', 'device_ms' (where there is a GPU)}; {} in smoke runs."""
  if args.smoke:
    return {}
  ks = jax.random.split(jax.random.key(s + 7), 3)
  q = rand(ks[0], (1, s, h, 128))
  k, v = (rand(kk, (1, s, kh, 128)) for kk in ks[1:])
  f = dense_impls(args, h, 128)["cudnn"]
  r = bench(f, q, k, v, reps=args.reps, device=True)
  return {key: r[key] for key in ("ms", "device_ms") if key in r}


# -- block-sparse, 10% kept -----------------------------------------------------------------------
def run_block_sparse(args, rows, dense_ms):
  s, h, d = args.sparse_len, args.heads, 128
  ks = jax.random.split(jax.random.key(11), 4)
  q, k, v = (rand(kk, (1, s, h, d)) for kk in ks[:3])
  variants = [("triton", 64, 64), ("triton", 128, 64), ("triton", 128, 128), ("mosaic_gpu", 128, 64),
              ("mosaic_gpu tiles_fastest", 128, 128), ("mosaic_gpu", 128, 128), ("mosaic_gpu stages=3", 128, 64)]
  for impl, bq, bk in variants[:1] if args.smoke else variants:
    layout, density = bs_layout(ks[3], s, h, bq, bk, args.keep)

    kernel = block_sparse_attention if impl == "triton" else functools.partial(
        block_sparse_attention_mgpu, heads_fastest="tiles_fastest" not in impl,
        stages=3 if "stages=3" in impl else 2)

    def f(q, k, v, layout, kernel=kernel):
      return kernel(q, k, v, layout, scale=d ** -0.5, interpret=args.smoke)[0]
    r = attempt(rows, f"block_sparse {impl} keep={args.keep} blocks {bq}x{bk} S={s}",
                lambda: bench(f, q, k, v, layout, reps=args.reps))
    r.update(section="block_sparse", impl=impl, S=s, block_q=bq, block_k=bk, density=density)
    if "ms" in r and dense_ms:
      r["speedup"] = dense_ms / r["ms"]
      r["efficiency"] = density * dense_ms / r["ms"]


# -- vertical-slash -------------------------------------------------------------------------------
def vs_pattern(rng, s, h, v, n_slash):
  """BENCHMARKS.md: verticals = the 30 first columns + (v - 30) uniform random ones; slashes = the
  nearest (n_slash - 50) diagonals + 50 uniform random far diagonals. Per head; [1, H, n] int32."""
  vert = np.empty((h, v), np.int64)
  sl = np.empty((h, n_slash), np.int64)
  near = max(n_slash - 50, 0)
  for i in range(h):
    vert[i, :min(30, v)] = np.arange(min(30, v))
    if v > 30:
      vert[i, 30:] = rng.choice(np.arange(30, s), v - 30, replace=False)
    sl[i, :near] = np.arange(near)
    sl[i, near:] = rng.choice(np.arange(near, s), n_slash - near, replace=False)
  return vert[None].astype(np.int32), sl[None].astype(np.int32)


VS_PARTS = ("all", "no-far", "band", "far")


def vs_subset(vert, sl, part: str):
  """Part of a vs_pattern, for probes: all; no-far (without the 50 far slashes); band (the near
  slashes and the first column); far (the 50 far slashes and the first column, so no row is empty)."""
  near = max(sl.shape[-1] - 50, 0)
  if part not in VS_PARTS:
    raise ValueError(f"part must be one of {VS_PARTS}, got {part!r}")
  return {"all": (vert, sl), "no-far": (vert, sl[..., :near]), "band": (vert[..., :1], sl[..., :near]),
          "far": (vert[..., :1], sl[..., near:])}[part]


def bs_layout(key, s: int, h: int, bq: int, bk: int, keep: float):
  """The block-sparse benchmark's layout: each causal block kept with probability `keep`, the
  diagonal blocks always; returns (BlockSparse, density among the causal blocks)."""
  nq, nk = s // bq, s // bk
  qb = jnp.arange(nq)[:, None]
  kb = jnp.arange(nk)[None, :]
  causal = kb * bk <= qb * bq + bq - 1
  diag = causal & (kb * bk + bk - 1 >= qb * bq)
  mask = (jax.random.uniform(key, (1, h, nq, nk)) < keep) & causal | diag
  density = float(jnp.sum(mask)) / float(h * jnp.sum(causal))
  layout = jax.jit(blocks_from_mask, static_argnums=(1,), static_argnames=("block_q", "block_k"))(
      mask, int(jnp.max(jnp.sum(mask, -1))), block_q=bq, block_k=bk)
  return layout, density


def vs_list_sizes(n_slash: int, bq: int, bk: int) -> tuple[int, int]:
  """(max_ranges, max_blocks) that no query block of a BENCHMARKS.md pattern can exceed, so the
  builders never drop slashes: the near band of (n_slash - 50) diagonals is one run of at most
  n_near + bq - 1 keys, cut at 8-aligned windows of bk keys; each far slash spans bq keys at an
  unaligned offset, which is up to ceil((bq + 7) / bk) ranges or ceil((bq - 1) / bk) + 1 aligned blocks.
  (Before session 5 the far slashes got one entry each, and blocks with many far slashes lost
  some: the vertical-slash figures of sessions 2-4 were measured on truncated lists.)"""
  near, far = max(n_slash - 50, 0), min(50, n_slash)
  band = -(-(near + bq + 6) // bk) + 1
  return band + far * -(-(bq + 7) // bk), band + far * (-(-(bq - 1) // bk) + 1)


def vs_ranges_builder(s: int, nv: int, ns: int, bq: int, bk: int):
  """vertical_slash_to_ranges for a BENCHMARKS.md pattern of nv verticals and ns slashes at length
  s, with the list sizes that never drop an entry (`vs_list_sizes`) and room for every column
  (nv rounded up to 32): (vertical_idx, slash_idx) -> (KeyRanges, Columns)."""
  return functools.partial(vertical_slash_to_ranges, seq_len=s, block_q=bq, block_k=bk,
                           max_ranges=vs_list_sizes(ns, bq, bk)[0], max_cols=vs_max_cols(nv))


def vs_max_cols(nv: int) -> int:
  return max(32, -(-nv // 32) * 32)


def vs_density(vert, sl, s) -> float:
  """Exact fraction of causal (q, k) pairs with k a vertical or q - k a slash, averaged over heads."""
  total = 0.0
  for c, o in zip(vert[0].astype(np.int64), sl[0].astype(np.int64)):
    both = np.sum(np.maximum(s - (c[:, None] + o[None, :]), 0) > 0)  # pairs (c + o, c) on both
    total += np.sum(s - c) + np.sum(s - o) - both
  return total / (vert.shape[1] * s * (s + 1) / 2)


# vertical-slash rows: (kind, block_q, block_k, Triton column chunk); VS_EXTRA with --vs-all
VS_VARIANTS = (("ranges", 128, 128, 64), ("ranges mosaic_gpu", 128, 128, None),
               ("ranges mosaic_gpu", 128, 64, None), ("ranges mosaic_gpu stages=3", 128, 64, None),
               ("ranges mosaic_gpu", 56, 64, None))   # split mode: 56-row blocks per consumer
# exact: the isolated (far) slashes as diagonals (pallas_kernels/diagonals.py), the rest as ranges
VS_EXTRA = (("ranges", 64, 64, 32), ("ranges", 128, 128, 32), ("aligned blocks", 64, 64, 32),
            ("exact", 64, 64, 32), ("exact mosaic_gpu", 128, 64, None), ("exact mosaic_gpu", 56, 64, None),
            ("exact mosaic_gpu per_step=1", 56, 64, None), ("exact mosaic_gpu per_step=4", 56, 64, None),
            ("exact mosaic_gpu", 128, 128, None),   # no far-slash ranges, the 128x128 layout's costly part
            ("exact mosaic_gpu programs=16", 128, 64, None), ("exact mosaic_gpu programs=32", 128, 64, None),
            ("exact mosaic_gpu desc", 128, 64, None), ("exact mosaic_gpu desc", 128, 128, None))  # offsets descending


def vs_variant_names() -> dict:
  """'kind BQxBK' -> row, for --vs-variants."""
  return {f"{x[0]} {x[1]}x{x[2]}": x for x in VS_VARIANTS + VS_EXTRA}


def run_vertical_slash(args, rows, dense_ms_by_kh, dense_device_ms_by_kh):
  s, h, d = args.sparse_len, args.heads, 128
  rng = np.random.default_rng(0)
  for kh in dict.fromkeys((h, args.gqa_kv_heads)):   # --gqa-kv-heads = --heads: no GQA rows
    ks = jax.random.split(jax.random.key(13 + kh), 3)
    q = rand(ks[0], (1, s, h, d))
    k, v = (rand(kk, (1, s, kh, d)) for kk in ks[1:])
    dense_ms = dense_ms_by_kh.get(kh)
    for nv, ns in args.vs_sets:
      vert, sl = vs_pattern(rng, s, h, min(nv, s), min(ns, s))
      density = vs_density(vert, sl, s)
      vj, sj = jnp.asarray(vert), jnp.asarray(sl)
      variants = list(VS_VARIANTS)
      if args.vs_all and kh == h:
        variants += VS_EXTRA
      if args.smoke:  # the plumbing of both layouts and of the exact mode, once
        variants = [("ranges", 64, 64, 32), ("aligned blocks", args.vs_block, args.vs_block, 32),
                    ("exact", 64, 64, 32)] if kh == h else []
      if args.vs_variants:
        variants = [x for n, x in vs_variant_names().items() if n in args.vs_variants.split(",")]
      variants = [(kind, args.vs_block, args.vs_block, c) if kind == "aligned blocks" else (kind, bq, bk, c)
                  for kind, bq, bk, c in variants]   # the grid-aligned builder's blocks: --vs-block
      for kind, bq, bk, chunk in variants:
        if kind.startswith("ranges"):
          build = vs_ranges_builder(s, nv, ns, bq, bk)
        elif kind.startswith("exact"):
          build = (lambda vert, sl, rb=vs_ranges_builder(s, nv, ns, bq, bk), bq=bq:
                   rb(vert, split_isolated_slashes(sl, s, bq, 64)[0]))
        else:
          build = functools.partial(vertical_slash_to_layout, seq_len=s, block_q=bq, block_k=bk,
                                    max_blocks=vs_list_sizes(ns, bq, bk)[1], max_cols=vs_max_cols(nv))

        def f(q, k, v, vert, sl, build=build, chunk=chunk, mosaic="mosaic" in kind,
              stages=3 if "stages=3" in kind else 2, exact=kind.startswith("exact"), bq=bq, bk=bk,
              per_step=int(kind.split("per_step=")[1]) if "per_step=" in kind else None,
              descending="desc" in kind.split(),
              programs=int(kind.split("programs=")[1]) if "programs=" in kind else None):
          if exact:
            return exact_vertical_slash_attention(
                q, k, v, vert, sl, scale=d ** -0.5, block_q=bq, block_k=bk, max_ranges=vs_list_sizes(ns, bq, bk)[0],
                max_cols=vs_max_cols(nv), **({"diagonals_per_step": per_step} if per_step else {}),
                diagonal_programs=programs, diagonal_descending=descending,
                implementation="mosaic_gpu" if mosaic else "triton",
                interpret=args.smoke)[0]
          layout, cols = build(vert, sl)
          if mosaic:
            return block_sparse_attention_mgpu(q, k, v, layout, scale=d ** -0.5, columns=cols,
                                               stages=stages)[0]
          return block_sparse_attention(q, k, v, layout, scale=d ** -0.5, columns=cols, column_chunk=chunk,
                                        interpret=args.smoke)[0]

        def timed(f=f, build=build):
          if bool(jnp.any(build(vj, sj)[0].saturated())):  # a full list may have dropped entries
            raise RuntimeError("vertical-slash list full: entries may have been dropped; raise vs_list_sizes")
          return bench(f, q, k, v, vj, sj, reps=args.reps, device=True)
        r = attempt(rows, f"vertical_slash {kind} {bq}x{bk} {chunk or ''} (v={nv}, s={ns}) K={kh} S={s}", timed)
        r.update(section="vertical_slash", S=s, v=nv, s=ns, kv_heads=kh, density=density, layout=kind,
                 block=f"{bq}x{bk}" + (f" cols/{chunk}" if chunk else ""), minference_ms=MINFERENCE_MS.get((nv, ns)))
        if "ms" in r:
          try:
            r["index_ms"] = bench(build, vj, sj, reps=args.reps)["ms"]
          except Exception as e:  # noqa: BLE001
            r["index_ms_error"] = str(e)[:200]
          if dense_ms:
            r["speedup"] = dense_ms / r["ms"]
            r["efficiency"] = density * dense_ms / r["ms"]
          if dense_device_ms_by_kh.get(kh) and r.get("device_ms"):
            r["speedup_device"] = dense_device_ms_by_kh[kh] / r["device_ms"]


# -- flash tuning ---------------------------------------------------------------------------------
def run_flash_tune(args, rows):
  b, h, d = 1, args.heads, 128
  for s in args.tune_seqs:
    ks = jax.random.split(jax.random.key(s), 3)
    q, k, v = (rand(kk, (b, s, h, d)) for kk in ks)
    for bq, bk, w, st in ((128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3),
                          (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 4), (128, 32, 4, 4)):
      def f(q, k, v):
        return flash_attention(q, k, v, scale=d ** -0.5, block_q=bq, block_k=bk, num_warps=w,
                               num_stages=st, interpret=args.smoke)[0]
      r = attempt(rows, f"tune flash S={s} bq={bq} bk={bk} warps={w} stages={st}",
                  lambda: bench(f, q, k, v, reps=args.reps))
      r.update(section="tune_flash", S=s, block_q=bq, block_k=bk, num_warps=w, num_stages=st)
      if "ms" in r:
        r["TFLOP/s"] = 2 * b * h * s * s * d / (r["ms"] * 1e-3) / 1e12


def parse_lengths(s: str) -> list[int]:
  out = []
  for part in s.split(","):
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", part)
    if not m:
      raise SystemExit(f"bad length {part!r}: use e.g. 8k,32k,128k")
    out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default="copy,dense,block_sparse,vertical_slash,decode",
                 help="sections, comma-separated (copy, dense, block_sparse, vertical_slash, decode)")
  p.add_argument("--seqs", default="8k,32k,128k", help="dense lengths")
  p.add_argument("--sparse-len", default="128k", help="block-sparse and vertical-slash length")
  p.add_argument("--decode-len", default="128k")
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--gqa-kv-heads", type=int, default=8)
  p.add_argument("--keep", type=float, default=0.10, help="block-sparse: fraction of causal blocks kept")
  p.add_argument("--vs-block", type=int, default=64)
  p.add_argument("--vs-all", action="store_true", help="vertical-slash: also the slower Triton variants and the exact mode "
                 "(isolated slashes as diagonals: 'exact 64x64', 'exact mosaic_gpu 56x64' (+ 'per_step=1', 4), "
                 "128x64 (the H200 headline), 128x128; 'programs=16' (32) 128x64: the diagonals as persistent "
                 "programs; 'desc' 128x64 and 128x128: the diagonals' offsets walked descending)")
  p.add_argument("--vs-variants", default="", help='vertical-slash: only these, e.g. "ranges mosaic_gpu 128x64"')
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--burst-s", type=float, default=kernel_report.BURST_S,
                 help="seconds of back-to-back calls per timed sample (each sample also carries ~1 ms of "
                      "dispatch and sync on the H200 host)")
  p.add_argument("--tune", action="store_true", help="also sweep flash / flash-decoding block sizes")
  p.add_argument("--tune-seqs", default="8k,32k")
  p.add_argument("--smoke", action="store_true", help="tiny shapes in Pallas interpret mode (CPU)")
  p.add_argument("--out", default="benchmarks/results")
  args = p.parse_args(argv)
  only = set(args.only.split(","))
  args.seqs, args.tune_seqs = parse_lengths(args.seqs), parse_lengths(args.tune_seqs)
  args.sparse_len, args.decode_len = parse_lengths(args.sparse_len)[0], parse_lengths(args.decode_len)[0]
  args.vs_sets = VS_SETS
  unknown = [n for n in args.vs_variants.split(",") if n and n not in vs_variant_names()]
  if unknown:   # a misspelt row would silently vanish from the table
    raise SystemExit(f"--vs-variants: unknown {unknown}; known: {sorted(vs_variant_names())}")
  kernel_report.BURST_S = args.burst_s
  if args.smoke:
    args.seqs, args.tune_seqs, args.sparse_len, args.decode_len = [128], [64], 256, 256
    args.heads, args.gqa_kv_heads, args.reps, args.vs_sets = 2, 1, 1, ((40, 60),)
    kernel_report.BURST_S = 0.005   # plumbing only: short samples
  elif jax.devices()[0].platform != "gpu":
    raise SystemExit("benchmarks/kernels.py needs a CUDA GPU (or --smoke for a CPU plumbing check)")
  info = {**device_info(), "reps": args.reps, "burst_s": kernel_report.BURST_S}
  print(json.dumps(info), flush=True)
  command = "PYTHONPATH=. python3 benchmarks/kernels.py " + shlex.join(argv if argv is not None else sys.argv[1:])
  slug = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = f"kernels-{slug}" + ("-smoke" if args.smoke else "")

  def save(rows):
    (out / f"{stem}.json").write_text(json.dumps({"info": info, "command": command, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown(info, rows, command))
  kernel_report.SAVE = save
  rows: list[dict] = []
  copy_gbs = None
  if "copy" in only:
    copy_gbs = attempt(rows, "copy", lambda: copy_bandwidth(args)).get("GB/s")
  if "dense" in only:
    run_dense(args, rows)
  if {"block_sparse", "vertical_slash"} & only:
    dense_ms, dense_device_ms = {}, {}
    for kh in dict.fromkeys((args.heads, args.gqa_kv_heads)):
      r = attempt(rows, f"cudnn dense reference S={args.sparse_len} K={kh}",
                  lambda: cudnn_dense(args, args.sparse_len, args.heads, kh))
      dense_ms[kh], dense_device_ms[kh] = r.get("ms"), r.get("device_ms")
    if "block_sparse" in only:
      run_block_sparse(args, rows, dense_ms[args.heads])
    if "vertical_slash" in only:
      run_vertical_slash(args, rows, dense_ms, dense_device_ms)
  if "decode" in only:
    run_decode(args, rows, copy_gbs)
  if args.tune:
    run_flash_tune(args, rows)
    cfgs = [dict(num_splits=n, block_k=bk, num_warps=w, num_stages=st)
            for n in (16, 32) for bk, w, st in ((64, 4, 2), (64, 4, 3), (64, 2, 3), (128, 4, 2), (128, 2, 3),
                                                (256, 4, 2), (256, 8, 2))]
    run_decode(args, rows, copy_gbs, configs=cfgs)
    run_quant_tune(args, rows)
  save(rows)
  print(markdown(info, rows, command))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
