"""Probe (GPU): the L2 -> SM read ceiling of this GPU, the bound on the vertical-slash sets' far slashes.

Why: the 50 far slashes of (30, 800) and (100, 800) need one K row and one V row per (row, slash)
pair, 52.4 GB at 128K with H = 32 (isolated slashes share no rows within a tile that fits in
shared memory), and every such row crosses L2 into an SM. 65% efficiency on those sets allows
4.90 / 5.32 ms for the whole call, i.e. >= 10.7 / 9.9 TB/s of L2 reads with everything else free.
The best rate any kernel of ours reached is 6.7 TB/s (the diagonal kernel, session 20). This probe
measures what the hardware gives a kernel that does nothing but read an L2-resident buffer:

- `triton`: Pallas (Triton lowering) programs, each XOR-folding blocks of rows x 256 bytes
  (`unroll` blocks loaded per loop step, so several loads are in flight), every program walking
  the whole buffer from its own starting block, so all SMs read the same lines (as the far slashes'
  query blocks of one head read the same K/V rows);
- `tma`: Pallas Mosaic GPU CTAs copying row blocks into a ring of shared-memory slots with TMA
  (the Hopper kernel's load path), nothing computed.

Rate = bytes the programs read / kernel time. The buffer (--mb, default 8 and 32) fits the
H100/H200's 50 MB L2 after its first pass, so the rate is L2's, not HBM's; a buffer of 512 MB
beside it gives HBM's for comparison.
    PYTHONPATH=. python3 benchmarks/probes/l2_probe.py [--mb 8 32 512] [--reads-gb 40]"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_report import bench  # noqa: E402
from lcinfer.pallas_kernels.launch import triton_call  # noqa: E402

ROW_WORDS = 64   # a row: 64 int32 words, 256 bytes (one bf16 K row at D = 128)


def _fold_kernel(x_ref, o_ref, *, rows, n_steps, unroll, programs):
  """Program p XOR-folds blocks p, p + programs, ... (mod the buffer's blocks), `unroll` a step."""
  pid = pl.program_id(0)
  n_blocks = x_ref.shape[0] // rows

  def body(i, acc):
    for u in range(unroll):
      blk = lax.rem(pid + (i * unroll + u) * programs, n_blocks)
      acc = acc ^ x_ref[pl.ds(pl.multiple_of(blk * rows, rows), rows), :]
    return acc
  acc = lax.fori_loop(0, n_steps, body, jnp.zeros((rows, ROW_WORDS), jnp.int32))
  o_ref[...] = jnp.sum(acc, axis=0, keepdims=True)


def triton_read(x, *, programs, rows, unroll, n_steps, num_warps, num_stages, interpret=None):
  """[programs, 64] int32 folds of programs x n_steps x unroll blocks of `rows` rows of x [N, 64]."""
  kernel = functools.partial(_fold_kernel, rows=rows, n_steps=n_steps, unroll=unroll, programs=programs)
  out = jax.ShapeDtypeStruct((programs, ROW_WORDS), jnp.int32)
  return triton_call(kernel, (x,), grid=(programs,), in_specs=[pl.BlockSpec(x.shape, lambda p: (0, 0))],
                     out_specs=pl.BlockSpec((1, ROW_WORDS), lambda p: (p, 0)), out_shape=out,
                     num_warps=num_warps, num_stages=num_stages, interpret=interpret, name="lcinfer_l2_fold")


def fold_reference(x, *, programs, rows, unroll, n_steps):
  """What triton_read returns, in jnp: each program's blocks XORed, then its rows summed."""
  n_blocks = x.shape[0] // rows
  blocks = x[:n_blocks * rows].reshape(n_blocks, rows, ROW_WORDS)
  k = jnp.arange(n_steps * unroll)
  idx = (jnp.arange(programs)[:, None] + k[None, :] * programs) % n_blocks      # [P, n]
  folded = lax.reduce(blocks[idx], jnp.int32(0), lax.bitwise_xor, (1,))      # [P, rows, 64]
  return jnp.sum(folded, axis=1)


def tma_read(x16, *, programs, rows, n_steps, stages, interpret=None):
  """Mosaic GPU: each CTA copies n_steps blocks of `rows` rows of x16 [N, 128] bf16 (CTA p from
  block p on, stride programs) into a ring of `stages` shared-memory slots with TMA, waiting for
  each copy before reusing its slot; returns [programs * 8, 128], the first 8 rows of each CTA's
  last block. interpret: a plgpu.InterpretGPUParams (CPU tests)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  n_blocks = x16.shape[0] // rows
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def body(x_ref, o_ref):
    pid = lax.axis_index("cta")

    def scoped(smem, bars):
      def start(i):
        blk = lax.rem(pid + i * programs, n_blocks)
        slot = lax.rem(i, stages)
        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(pl.multiple_of(blk * rows, 8), rows)], smem.at[slot], bars.at[slot])
      for i in range(min(stages, n_steps)):
        start(jnp.int32(i))

      @pl.loop(0, n_steps)
      def _(i):
        plgpu.barrier_wait(bars.at[lax.rem(i, stages)])
        pl.when(i + stages < n_steps)(lambda: start(i + stages))
      last = smem.at[(n_steps - 1) % stages, pl.ds(0, 8)]
      plgpu.copy_smem_to_gmem(last, o_ref.at[pl.ds(pl.multiple_of(pid * 8, 8), 8)])
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(scoped, plgpu.SMEM((stages, rows, 128), x16.dtype, transforms=transforms),
                  plgpu.Barrier(num_barriers=stages))

  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((programs * 8, 128), x16.dtype), grid=(programs,),
                      grid_names=("cta",), kernel_name="lcinfer_l2_tma", interpret=interpret)(x16)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mb", type=int, nargs="*", default=[8, 32, 512], help="buffer sizes (MB)")
  ap.add_argument("--reads-gb", type=float, default=40.0, help="bytes read per call, all programs")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--knobs", nargs="*", default=["132,64,4,4,1", "132,64,8,8,1", "264,64,4,4,1", "264,64,8,8,1",
                                                  "132,128,4,8,1", "528,32,4,4,1", "132,16,8,4,1"],
                  help="triton: programs,rows,unroll,num_warps,num_stages")
  ap.add_argument("--tma", nargs="*", default=["132,128,4", "132,128,6", "264,128,3", "132,64,8"],
                  help="tma: programs,rows,stages")
  a = ap.parse_args()
  dev = jax.devices()[0]
  print(f"l2 device {dev.device_kind}, {a.reads_gb:.0f} GB read per call", flush=True)
  for mb in a.mb:
    n_rows = mb * 2 ** 20 // (ROW_WORDS * 4)
    x = jax.random.bits(jax.random.key(mb), (n_rows, ROW_WORDS), jnp.uint32).astype(jnp.int32)
    for spec in a.knobs:
      programs, rows, unroll, warps, stages = map(int, spec.split(","))
      n_steps = max(1, int(a.reads_gb * 1e9 / (programs * unroll * rows * ROW_WORDS * 4)))
      gb = programs * n_steps * unroll * rows * ROW_WORDS * 4 / 1e9
      f = functools.partial(triton_read, programs=programs, rows=rows, unroll=unroll, n_steps=n_steps,
                            num_warps=warps, num_stages=stages)
      try:
        ms = bench(f, x, reps=a.reps)["ms"]
      except Exception as e:  # noqa: BLE001 (a knob the compiler refuses: reported, the sweep goes on)
        print(f"l2 triton {mb} MB P={programs} rows={rows} unroll={unroll} warps={warps} stages={stages}: "
              f"failed: {str(e).splitlines()[0][:150]}", flush=True)
        continue
      print(f"l2 triton {mb} MB P={programs} rows={rows} unroll={unroll} warps={warps} stages={stages}: "
            f"{ms:7.3f} ms, {gb / ms:5.2f} TB/s", flush=True)
    x16 = lax.bitcast_convert_type(x, jnp.bfloat16).reshape(n_rows, 2 * ROW_WORDS)
    for spec in a.tma:
      programs, rows, stages = map(int, spec.split(","))
      n_steps = max(1, int(a.reads_gb * 1e9 / (programs * rows * 256)))
      gb = programs * n_steps * rows * 256 / 1e9
      f = functools.partial(tma_read, programs=programs, rows=rows, n_steps=n_steps, stages=stages)
      try:
        ms = bench(f, x16, reps=a.reps)["ms"]
      except Exception as e:  # noqa: BLE001
        print(f"l2 tma {mb} MB P={programs} rows={rows} stages={stages}: failed: {str(e).splitlines()[0][:150]}",
              flush=True)
        continue
      print(f"l2 tma {mb} MB P={programs} rows={rows} stages={stages}: {ms:7.3f} ms, {gb / ms:5.2f} TB/s", flush=True)


if __name__ == "__main__":
  main()
