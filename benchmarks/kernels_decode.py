"""The decode sections of `kernels.py` (flash-decoding over bf16 and quantized caches, and the
quantized kernel's config sweep), split out to keep that file small. Run through kernels.py."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernel_report import attempt, bench, bench_in_jit, prepare_in_jit, rand
from lcinfer.pallas_kernels import quant
from lcinfer.pallas_kernels.decode import decode_attention
from lcinfer.pallas_kernels.decode_quant import quantized_decode_attention
from lcinfer.pallas_kernels.decode_quant_mgpu import quantized_decode_attention_mgpu


# -- decode ---------------------------------------------------------------------------------------
def run_decode(args, rows, copy_gbs, configs=None):
  from lcinfer.attention.dense import DENSE

  b, kh, h, c, d = 1, args.gqa_kv_heads, args.heads, args.decode_len, 128
  ks = jax.random.split(jax.random.key(5), 3)
  q = rand(ks[0], (b, 1, h, d))
  k, v = (rand(kk, (b, kh, c, d)) for kk in ks[1:])
  pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, kh, c))
  qp = jnp.full((b, 1), c - 1, jnp.int32)
  nbytes = 2 * b * kh * c * d * 2
  copies = 2 if args.smoke else 8   # calls per executable (`bench_in_jit`)
  impls = {}
  if not configs:
    impls["lcinfer_flash_decode"] = lambda *a: decode_attention(*a, scale=d ** -0.5, interpret=args.smoke)[0]
    if not args.smoke:
      impls["dense_xla"] = lambda q, k, v, p, qp: DENSE.decode(q, k, v, q_pos_BT=qp, kv_pos_BKC=p,
                                                               scale=d ** -0.5)[0]
  for cfg in configs or []:
    impls[f"flash_decode {cfg}"] = (lambda cfg: lambda *a: decode_attention(
        *a, scale=d ** -0.5, interpret=args.smoke, **cfg)[0])(cfg)
  bf16_ms = bf16_dev = bf16_ref = None

  def bf16_timer(f, *a, reps):  # compiled once: its own samples and the quantized rows' paired ratios
    nonlocal bf16_ref
    bf16_ref = prepare_in_jit(f, *a, copies=copies)
    return bench_in_jit(f, *a, copies=copies, reps=reps, prepared=bf16_ref)

  for name, f in impls.items():
    timer = (bench if configs else bf16_timer if name == "lcinfer_flash_decode"
             else functools.partial(bench_in_jit, copies=copies))
    r = attempt(rows, f"decode {name} C={c} bf16", lambda: timer(f, q, k, v, pos, qp, reps=max(args.reps, 20)))
    r.update(section="tune_decode" if configs else "decode", impl=name, C=c, cache="bf16", kv_heads=kh)
    if "ms" in r:
      r["GB/s"] = nbytes / (r["ms"] * 1e-3) / 1e9
      if copy_gbs:
        r["x_copy_bw"] = r["GB/s"] / copy_gbs
      if name == "lcinfer_flash_decode":
        bf16_ms, bf16_dev = r["ms"], r.get("device_ms")
  if configs:
    return
  # quantized caches, KIVI-style: keys per channel (groups of 64 tokens), values per token; bf16 scales
  for bits in (8, 4, 2):
    kq = quant.quantize(k, bits=bits, axis="channel", group=min(64, c), scale_dtype=jnp.bfloat16)
    vq = quant.quantize(v, bits=bits, axis="token", group=d, scale_dtype=jnp.bfloat16)
    qbytes = quant.nbytes(kq) + quant.nbytes(vq)

    impls = {"lcinfer_quantized_decode": quantized_decode_attention}
    if bits == 4 and not args.smoke:  # the Hopper kernel serves the KIVI int4 layout
      impls["lcinfer_quantized_decode_mgpu"] = quantized_decode_attention_mgpu
    for name, fn in impls.items():
      def fq(q, kq, vq, pos, qp, fn=fn):
        return fn(q, kq, vq, pos, qp, scale=d ** -0.5, interpret=args.smoke)[0]
      r = attempt(rows, f"decode {name} int{bits} C={c}",
                  lambda: bench_in_jit(fq, q, kq, vq, pos, qp, copies=copies, reps=max(args.reps, 20),
                                       against=bf16_ref))
      r.update(section="decode", impl=name, C=c, cache=f"int{bits} (K per-channel g64, V per-token; bf16 scales)",
               kv_heads=kh, bytes=qbytes)
      if "ms" in r:
        r["GB/s"] = qbytes / (r["ms"] * 1e-3) / 1e9
        if copy_gbs:
          r["x_copy_bw"] = r["GB/s"] / copy_gbs
        if bf16_ms:
          r["x_bf16_time"] = r["ms"] / bf16_ms
        if bf16_dev and "device_ms" in r:
          r["x_bf16_device"] = r["device_ms"] / bf16_dev


def run_quant_tune(args, rows):
  """int4 KIVI-style cache: block_k x splits x warps x stages of the quantized flash-decoding kernel,
  and the plain int -> float unpacking for comparison."""
  b, kh, h, c, d = 1, args.gqa_kv_heads, args.heads, args.decode_len, 128
  ks = jax.random.split(jax.random.key(6), 3)
  q = rand(ks[0], (b, 1, h, d))
  kq = quant.quantize(rand(ks[1], (b, kh, c, d)), bits=4, axis="channel", group=min(64, c),
                      scale_dtype=jnp.bfloat16)
  vq = quant.quantize(rand(ks[2], (b, kh, c, d)), bits=4, axis="token", group=d, scale_dtype=jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, kh, c))
  qp = jnp.full((b, 1), c - 1, jnp.int32)
  nbytes = quant.nbytes(kq) + quant.nbytes(vq)
  grid = [dict(block_k=min(bk, c), num_splits=n, num_warps=w, num_stages=st)
          for bk in (64, 128) for n in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
  grid += [dict(block_k=min(bk, c), num_splits=128, num_stages=3) for bk in (32, 256)]
  grid += [dict(num_splits=128, num_stages=3, _unpack="float")]  # the int -> float conversion, for comparison
  for cfg in grid:

    def f(q, kq, vq, pos, qp, cfg=cfg):
      return quantized_decode_attention(q, kq, vq, pos, qp, scale=d ** -0.5, interpret=args.smoke, **cfg)[0]
    r = attempt(rows, f"decode int4 {cfg} C={c}", lambda: bench(f, q, kq, vq, pos, qp, reps=max(args.reps, 20)))
    r.update(section="tune_decode", C=c, cache="int4")
    if "ms" in r:
      r["GB/s"] = nbytes / (r["ms"] * 1e-3) / 1e9
