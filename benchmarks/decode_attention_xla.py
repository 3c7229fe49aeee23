"""Decode attention in XLA on a 32K bf16 cache (one layer, 8 KV heads x 4 query heads, D=128): the
single-einsum dense path against a split-K (flash-decoding style) XLA formulation. Prints GB/s of
K+V read. Run on a GPU: PYTHONPATH=. python3 benchmarks/decode_attention_xla.py (see NOTES.md)."""
import time, statistics
import jax, jax.numpy as jnp, numpy as np
from lcinfer.attention import get

def bench(f, *a, n=30):
  jax.block_until_ready(f(*a))
  ts = []
  for _ in range(n):
    t0 = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t0)
  return statistics.median(ts) * 1e3

B, K, G, C, D = 1, 8, 4, 32768 + 2048, 128
rng = np.random.default_rng(0)
k = jnp.asarray(rng.standard_normal((B, K, C, D)), jnp.bfloat16)
v = jnp.asarray(rng.standard_normal((B, K, C, D)), jnp.bfloat16)
pos = jnp.broadcast_to(jnp.where(jnp.arange(C) < 32768, jnp.arange(C), -1).astype(jnp.int32), (B, K, C))
q = jnp.asarray(rng.standard_normal((B, 1, K * G, D)), jnp.bfloat16)
qp = jnp.full((B, 1), 32768, jnp.int32)
kv_bytes = 2 * B * K * C * D * 2
dense = get("dense")
ref = jax.jit(lambda q, k, v, p: dense.decode(q, k, v, q_pos_BT=qp, kv_pos_BKC=p, scale=0.088))
t = bench(ref, q, k, v, pos)
print(f"dense.decode: {t:.3f} ms ({kv_bytes / t / 1e6:.0f} GB/s)")
r_out, r_lse = ref(q, k, v, pos)

def split(q, k, v, p, cs):
  b, t, h, d = q.shape
  c = k.shape[2]
  n = c // cs
  qq = q.reshape(b, t, K, G, d)
  kk = k.reshape(b, K, n, cs, d)
  vv = v.reshape(b, K, n, cs, d)
  pp = p.reshape(b, K, n, cs)
  s = jnp.einsum("BTKGD,BKNSD->BKNGTS", qq, kk, preferred_element_type=jnp.float32) * 0.088
  ok = (pp[:, :, :, None, None, :] >= 0) & (pp[:, :, :, None, None, :] <= qp[:, None, None, None, :, None])
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m)
  l = jnp.sum(e, axis=-1)
  o = jnp.einsum("BKNGTS,BKNSD->BKNGTD", e.astype(v.dtype), vv, preferred_element_type=jnp.float32)
  lse_n = jnp.where(l > 0, m[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)  # [B,K,N,G,T]
  lse = jax.nn.logsumexp(lse_n, axis=2)
  w = jnp.exp(lse_n - lse[:, :, None])
  out = jnp.sum(o * w[..., None] / jnp.where(l > 0, l, 1.0)[..., None], axis=2)  # [B,K,G,T,D]
  return out, lse

for cs in (256, 512, 1024, 2048, 4096):
  if C % cs:
    continue
  f = jax.jit(lambda q, k, v, p, cs=cs: split(q, k, v, p, cs))
  t = bench(f, q, k, v, pos)
  o, l = f(q, k, v, pos)
  o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, 1, K * G, D)
  err = float(jnp.max(jnp.abs(o - r_out.astype(jnp.float32))))
  print(f"split cs={cs}: {t:.3f} ms ({kv_bytes / t / 1e6:.0f} GB/s) maxerr {err:.2e}")
