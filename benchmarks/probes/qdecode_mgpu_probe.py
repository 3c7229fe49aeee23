"""Probe (H100): the Mosaic GPU int4 decode kernel against the oracle on a few shapes, then its time
at 128K next to the Triton int4 kernel and the bf16 flash-decoding kernel, over splits x stages.
    PYTHONPATH=. python3 benchmarks/probes/qdecode_mgpu_probe.py [--quick]"""
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench  # noqa: E402
from lcinfer.pallas_kernels import quant  # noqa: E402
from lcinfer.pallas_kernels.decode import decode_attention  # noqa: E402
from lcinfer.pallas_kernels.decode_quant import quantized_decode_attention, quantized_decode_reference  # noqa: E402
from lcinfer.pallas_kernels.decode_quant_mgpu import _dispatch_run  # noqa: E402


def inputs(b, t, h, kh, c, d=128, seed=0, trend=None):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, kh, c, d), jnp.float32)
  if trend is not None:  # logits that grow (or shrink) along the cache: the running max moves often
    k = k * jnp.linspace(*trend, c)[:, None]
  v = jax.random.normal(ks[2], (b, kh, c, d), jnp.float32)
  kq = quant.quantize(k, bits=4, axis="channel", group=min(64, c), scale_dtype=jnp.bfloat16)
  vq = quant.quantize(v, bits=4, axis="token", group=d, scale_dtype=jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, kh, c))
  qp = jnp.tile(jnp.arange(c - t, c, dtype=jnp.int32), (b, 1))
  return q, k, v, kq, vq, pos, qp


def check():
  for (b, t, h, kh, c, kw) in [(1, 1, 32, 8, 1024, {}), (2, 2, 16, 2, 640, dict(window=300)),
                               (1, 1, 8, 8, 192, dict(num_splits=2)), (1, 4, 64, 4, 4096, dict(num_stages=3)),
                               (1, 2, 32, 2, 1024, dict(holes=True)), (1, 1, 64, 1, 512, {}),
                               (1, 1, 32, 8, 8192, dict(trend=(0.1, 6.0))), (1, 1, 32, 8, 8192, dict(trend=(6.0, 0.1)))]:
    q, k, v, kq, vq, pos, qp = inputs(b, t, h, kh, c, trend=kw.pop("trend", None))
    if kw.pop("holes", False):
      pos = jnp.where(jax.random.uniform(jax.random.key(9), pos.shape) < 0.2, -1, pos)
    ref, rl = quantized_decode_reference(q, kq, vq, pos, qp, scale=128 ** -0.5, window=kw.get("window"))
    variants = [dict(), dict(sub=1), dict(q_direct=False), dict(issue_warp=True), dict(issue_warp=True, sub=1),
                dict(pair=True), dict(pair=True, issue_warp=True)] + (
        [dict(lazy_max=False)] if c > 4096 else [])
    for var in variants:
      try:
        out, lse = _dispatch_run(q, kq, vq, pos, qp, scale=128 ** -0.5, window=kw.get("window"), residual=None,
                                 num_splits=kw.get("num_splits", 8), block_k=64,
                                 num_stages=kw.get("num_stages", 2), **var)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        scale_ = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
        lerr = float(jnp.max(jnp.abs(lse - rl)))
        print(f"check {var} b={b} t={t} h={h} kh={kh} c={c} {kw}: max|err| {err:.4g} "
              f"(max|ref| {scale_:.3g}) lse err {lerr:.3g}", flush=True)
      except Exception:
        traceback.print_exc()
        print(f"check {var} b={b} t={t} h={h} kh={kh} c={c} {kw}: FAILED", flush=True)


def timing(quick):
  c = 128 * 1024
  q, k, v, kq, vq, pos, qp = inputs(1, 1, 32, 8, c)
  s = 128 ** -0.5
  rows = []
  r = bench(lambda *a: decode_attention(*a, scale=s)[0], q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
            pos, qp, reps=20)
  bf16 = r["ms"]
  rows.append(("bf16 flash-decode", bf16))
  r = bench(lambda *a: quantized_decode_attention(*a, scale=s)[0], q, kq, vq, pos, qp, reps=20)
  rows.append(("int4 triton", r["ms"]))
  variants = [dict(), dict(issue_warp=True), dict(pair=True), dict(pair=True, issue_warp=True), dict(num_stages=3)]
  rounds = 1 if quick else 3   # interleaved: run-to-run spread next to the differences
  cfgs = [dict(dict(num_splits=49, num_stages=2), **v) for _ in range(rounds) for v in variants]
  for cfg in cfgs:
    try:
      r = bench(lambda *a, cfg=cfg: _dispatch_run(*a, scale=s, window=None, residual=None, block_k=64, **cfg)[0],
                q, kq, vq, pos, qp, reps=20)
      rows.append((f"int4 mosaic {cfg}", r["ms"]))
    except Exception as e:
      rows.append((f"int4 mosaic {cfg} FAILED {type(e).__name__}: {str(e)[:200]}", float("nan")))
  for name, ms in rows:
    print(f"{name:60s} {ms:8.4f} ms  {ms / bf16:6.3f}x bf16", flush=True)


if __name__ == "__main__":
  if "--no-check" not in sys.argv:
    check()
  timing("--quick" in sys.argv)
