"""Tiny models and references shared by the tests."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import lcinfer
from lcinfer.attention.base import merge_attention
from lcinfer.pallas_kernels.diagonals import diagonal_reference
from lcinfer.pallas_kernels.sparse_index import Columns
from lcinfer.pallas_kernels.vertical_slash import vertical_slash_to_ranges

TINY = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2)


def tiny_config(**over) -> lcinfer.ModelConfig:
  return lcinfer.ModelConfig.from_hf({**TINY, **over})


def tiny_llm(dtype="float32", seed=0, **over) -> lcinfer.LLM:
  return lcinfer.LLM.random(tiny_config(**over), dtype=dtype, seed=seed, attention="dense")


def naive_attention(q, k, v, q_pos, kv_pos, scale, window=None, q_seg=None, kv_seg=None):
  """float64 numpy reference: q [B,T,H,D], k/v [B,S,K,D] -> out [B,T,H,D], lse [B,T,H]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  out = np.zeros((b, t, h, v.shape[-1]))
  lse = np.full((b, t, h), -np.inf)
  for bi in range(b):
    for hi in range(h):
      kk, vv = k[bi, :, hi // g], v[bi, :, hi // g]
      for ti in range(t):
        qp = q_pos[bi, ti]
        ok = (kv_pos[bi] >= 0) & (qp >= 0) & (kv_pos[bi] <= qp)
        if window is not None:
          ok &= qp - kv_pos[bi] < window
        if q_seg is not None:
          ok &= kv_seg[bi] == q_seg[bi, ti]
        if not ok.any():
          continue
        s = kk[ok] @ q[bi, ti, hi] * scale
        m = s.max()
        p = np.exp(s - m)
        lse[bi, ti, hi] = m + np.log(p.sum())
        out[bi, ti, hi] = (p / p.sum()) @ vv[ok]
  return out, lse


def self_attention_qkv(rng, b, t, h, kh, d, dtype):
  """Random q [B, T, H, D] and k, v [B, T, KH, D] (self-attention: S = T) in `dtype`, as jax arrays."""
  dt = jnp.dtype(dtype)
  return tuple(jnp.asarray(rng.standard_normal(shape), dt) for shape in ((b, t, h, d), (b, t, kh, d), (b, t, kh, d)))


def assert_matches_oracle(name, out, lse, ref, ref_lse, dtype):
  """Kernel (out, lse) against a float32 oracle; outputs were NaN-poisoned before the run, so an
  unwritten element shows as NaN. Returns the mask of rows that see no key (lse = -inf)."""
  out, lse, ref, ref_lse = (np.asarray(x, np.float32) for x in (out, lse, ref, ref_lse))
  assert not np.isnan(out).any() and not np.isnan(lse).any(), f"{name}: unwritten (NaN) elements"
  empty = np.isneginf(ref_lse)
  np.testing.assert_array_equal(np.isneginf(lse), empty, err_msg=f"{name}: -inf rows differ")
  assert np.all(out[empty] == 0), f"{name}: rows that see nothing must be 0"
  assert np.isfinite(out).all() and np.isfinite(lse[~empty]).all()
  tol = 1e-5 if dtype == "float32" else 1e-2
  rel = np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-6)
  assert rel < tol, f"{name}: out rel err {rel:.2e} >= {tol}"
  if (~empty).any():
    lrel = np.max(np.abs(lse[~empty] - ref_lse[~empty]) / np.maximum(np.abs(ref_lse[~empty]), 1.0))
    assert lrel < tol, f"{name}: lse rel err {lrel:.2e} >= {tol}"
  return empty


def numpy_split(sl, t, gap, max_diag):
  """Per head: (sorted valid offsets left as slashes, the isolated ones taken as diagonals)."""
  o = np.sort(sl[(sl >= 0) & (sl < t)])
  iso = [x for i, x in enumerate(o) if all(abs(x - y) >= gap for j, y in enumerate(o) if j != i)]
  taken = iso[:max_diag]
  rest = list(o)
  for x in taken:
    rest.remove(x)
  return rest, taken


def numpy_exact_mask(vert, sl, t, bq, gap, max_diag):
  """The exact mode's key set from the pattern: k <= i and (k a vertical, or i - k a taken
  isolated slash, or k in [q0 - o, q1 - o] of row i's block for a slash o left as a range)."""
  b, h = sl.shape[:2]
  i, k = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
  q0 = (i // bq) * bq
  q1 = np.minimum(q0 + bq, t) - 1
  mask = np.zeros((b, h, t, t), bool)
  for bi in range(b):
    for hi in range(h):
      rest, taken = numpy_split(sl[bi, hi], t, gap, max_diag)
      m = np.isin(k, vert[bi, hi]) | np.isin(i - k, taken)
      for o in rest:
        m |= (k >= q0 - o) & (k <= q1 - o)
      mask[bi, hi] = m & (k <= i)
  return mask


def diagonal_case(rng, q, bq, excl=None, merge=False):
  """Inputs of a diagonal-attention test against its oracle, for q [B, T, H, D]: offsets [B, H, 9]
  at random in and around [0, T), head (0, 0) with none (its rows see nothing) and head (1, 0) with
  a repeat and offset 0; excl "both": a vertical-slash index's ranges (garbage past each count) and
  columns, "columns": an unsorted shared list with repeats and strays, random prefixes per block;
  merge: another call's (out, lse), some rows -inf. Returns (offsets, ranges, columns, other)."""
  b, t, h, d = q.shape
  offs = rng.integers(-4, t + 4, (b, h, 9)).astype(np.int32)
  offs[0, 0] = -1
  offs[1, 0, :3] = [5, 5, 0]
  ranges = cols = other = None
  if excl == "both":
    vert = jnp.asarray(rng.integers(0, t, (b, h, 6)), jnp.int32)
    sl = jnp.asarray(rng.integers(0, t, (b, h, 5)), jnp.int32)
    ranges, cols = vertical_slash_to_ranges(vert, sl, t, bq, 16, 20, 14)
    past = jnp.arange(ranges.start.shape[-1]) >= ranges.count[..., None]
    junk = jnp.asarray(rng.integers(0, t, ranges.start.shape), jnp.int32)
    ranges = dataclasses.replace(ranges, start=jnp.where(past, junk, ranges.start),
                                 end=jnp.where(past, junk + 8, ranges.end))
  if excl == "columns":
    nq = -(-t // bq)
    cols = Columns(jnp.asarray(rng.integers(0, 13, (b, h, nq)), jnp.int32),
                   jnp.asarray(rng.integers(-2, t + 2, (b, h, 1, 12)), jnp.int32))
  if merge:
    other = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32).astype(q.dtype),
             jnp.asarray(np.where(rng.random((b, t, h)) < 0.3, -np.inf, rng.standard_normal((b, t, h))), jnp.float32))
  return jnp.asarray(offs), ranges, cols, other


# the oracle under jit: op by op, its dense exclusion masks take seconds a case on CPU
_diagonal_reference = jax.jit(diagonal_reference, static_argnames=("scale", "block_q"))


def diagonal_oracle(q, k, v, offsets, other=None, **kw):
  """diagonals.diagonal_reference merged with `other` when given: (out, lse) in float32."""
  ref = _diagonal_reference(q, k, v, offsets, **kw)
  return ref if other is None else merge_attention([(other[0].astype(jnp.float32), other[1]), ref])


def emulate_ptx(asm: str, inputs: dict, dtype) -> dict:
  """A numpy model of the few PTX instructions lcinfer's unpacking blocks use (mov.b32, prmt.b32 in
  default mode, shr.b32, lop3.b32 with LUT 0xEA = (a & b) | c, sub.rn / fma.rn on bf16x2 or f16x2),
  run on uint32 arrays `inputs` ({"$2": words, ...}); returns every register as uint32."""
  np_dt = np.dtype(jnp.dtype(dtype))
  kind = "bf16" if np_dt == np.dtype(jnp.bfloat16) else "f16"
  n = len(next(iter(inputs.values())))
  regs = {k: np.asarray(v).astype(np.uint64) for k, v in inputs.items()}
  val = lambda a: regs[a] if a in regs else np.full(n, int(a, 0), np.uint64)  # noqa: E731

  def lanes(x):  # uint32 -> [n, 2] float64 values of the two 16-bit lanes
    return np.stack([x & 0xFFFF, x >> 16], axis=-1).astype(np.uint16).view(np_dt).astype(np.float64)

  def pack(f):  # [n, 2] float64 -> uint32, one rounding to the 16-bit type
    d = f.astype(np_dt).view(np.uint16).astype(np.uint64)
    return d[..., 0] | (d[..., 1] << np.uint64(16))

  for line in asm.splitlines():
    line = line.strip().rstrip(";")
    if not line or line in "{}" or line.startswith(".reg"):
      continue
    op, args = line.split(None, 1)
    a = [x.strip() for x in args.split(",")]
    x = [val(y) for y in a[1:]]
    if op == "mov.b32":
      regs[a[0]] = x[0]
    elif op == "prmt.b32":
      src = x[0] | (x[1] << np.uint64(32))
      sel = int(a[3], 0)
      regs[a[0]] = sum(((src >> np.uint64(8 * ((sel >> (4 * i)) & 7))) & np.uint64(0xFF)) << np.uint64(8 * i)
                       for i in range(4))
    elif op == "shr.b32":
      regs[a[0]] = x[0] >> np.uint64(int(a[2]))
    elif op == "lop3.b32":
      assert int(a[4], 0) == 0xEA, "only (a & b) | c is modelled"
      regs[a[0]] = (x[0] & x[1]) | x[2]
    elif op == f"sub.rn.{kind}x2":
      regs[a[0]] = pack(lanes(x[0]) - lanes(x[1]))
    elif op == f"fma.rn.{kind}x2":
      regs[a[0]] = pack(lanes(x[0]) * lanes(x[1]) + lanes(x[2]))
    else:
      raise AssertionError(f"unmodelled instruction {op}")
  return {k: v.astype(np.uint32) for k, v in regs.items()}
