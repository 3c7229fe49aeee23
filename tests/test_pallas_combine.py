"""The split combination: the jnp reference against float64 numpy, then the kernel (interpret mode)
against the jnp reference."""
import jax.numpy as jnp
import numpy as np
import pytest

from lcinfer.pallas_kernels import combine
from lcinfer.pallas_kernels.combine import combine_splits, from_kv_head_rows
from lcinfer.pallas_kernels.mgpu_int4 import value_channel_order


def test_combine_splits_matches_float64_logsumexp():
  """The split combination against numpy in float64 (max, exp, weighted mean): splits with
  lse far apart (weights e^-60), empty splits (-inf), a row every split left empty (out 0, lse
  -inf), a padded row past `rows` dropped, and a NaN partial that stays NaN."""
  rng = np.random.default_rng(3)
  o = rng.standard_normal((2, 3, 7, 5, 16)).astype(np.float32)
  lse = (rng.standard_normal((2, 3, 7, 5)) * 20).astype(np.float32)
  lse[0, 0, 2] = -np.inf                 # an empty split
  lse[1, 2, :, 1] = -np.inf              # row 1 of (1, 2): every split empty
  lse[1, 0, 4, 0] = 60.0                 # one split dominating its row
  o[0, 1, 3, 2, 5] = np.nan              # an unwritten partial
  o[..., 4, :] = np.nan                  # padded row 4: never read
  out, got_lse = combine_splits(jnp.asarray(o), jnp.asarray(lse), 4)
  out, got_lse = np.asarray(out), np.asarray(got_lse)
  o64, l64 = o[..., :4, :].astype(np.float64), lse[..., :4].astype(np.float64)
  m = np.max(l64, axis=2, keepdims=True)
  w = np.where(np.isfinite(l64), np.exp(l64 - np.where(np.isfinite(m), m, 0.0)), 0.0)
  den = w.sum(axis=2)
  with np.errstate(invalid="ignore", divide="ignore"):
    want = np.einsum("bksr,bksrd->bkrd", w, o64) / den[..., None]
    want_lse = np.where(den > 0, m[:, :, 0] + np.log(den), -np.inf)
  want[den == 0] = 0.0
  assert out.shape == (2, 3, 4, 16) and got_lse.shape == (2, 3, 4)
  assert np.isnan(out[0, 1, 2, 5]) and np.isnan(want[0, 1, 2, 5])
  finite = ~np.isnan(want)
  np.testing.assert_allclose(out[finite], want[finite], rtol=2e-6, atol=1e-6)
  assert np.all(out[1, 2, 1] == 0) and np.isneginf(got_lse[1, 2, 1])
  np.testing.assert_allclose(got_lse, want_lse, rtol=1e-6)


def _partials(b, kh, splits, g, g_pad, d, seed):
  """Random partials in both layouts, padded splits and rows filled with NaN (never to be read),
  one empty split, one row every split left empty, lse spread over +-40."""
  rng = np.random.default_rng(seed)
  s_pad = combine.padded_splits(splits, g)
  o = np.full((b, kh, s_pad, g_pad, d), np.nan, np.float32)
  lse = np.full((b, kh, s_pad, g_pad), np.nan, np.float32)
  o[:, :, :splits, :g] = rng.standard_normal((b, kh, splits, g, d))
  lse[:, :, :splits, :g] = rng.standard_normal((b, kh, splits, g)) * 20
  lse[0, 0, splits // 2, :g] = -np.inf
  if g > 1:
    lse[-1, -1, :splits, g - 1] = -np.inf
  return o, lse


def _want(o, lse, splits, g):
  out, l = combine_splits(jnp.asarray(o[:, :, :splits]), jnp.asarray(lse[:, :, :splits]), g)
  return (np.asarray(x) for x in from_kv_head_rows(out, l, 1))


@pytest.mark.parametrize("b,kh,splits,g,g_pad,d", [
    (1, 2, 49, 4, 8, 128),    # the int4 benchmark's grid (49 splits -> 64 allocated)
    (2, 1, 5, 1, 16, 64),     # one head per kv head, 5 splits -> 8
    (1, 1, 70, 8, 8, 64),     # past one chunk: 70 splits in chunks of 32, a running maximum
    (1, 2, 3, 16, 16, 32)])
@pytest.mark.parametrize("layout", ["rows", "channels"])
@pytest.mark.parametrize("channels", [32, 8])
def test_combine_kernel_matches_reference(b, kh, splits, g, g_pad, d, layout, channels):
  o, lse = _partials(b, kh, splits, g, g_pad, d, seed=splits + g)
  want_out, want_lse = _want(o, lse, splits, g)
  o_in = o if layout == "rows" else np.ascontiguousarray(np.swapaxes(o, -1, -2))
  out, got_lse = combine.combine_partials(jnp.asarray(o_in), jnp.asarray(lse), splits=splits, g=g, layout=layout,
                                          out_dtype=jnp.float32, interpret=True, channels=channels)
  assert out.shape == (b, 1, kh * g, d) and got_lse.shape == (b, 1, kh * g)
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_lse), want_lse, rtol=1e-6)
  if g > 1:   # the row no split saw: out 0, lse -inf
    assert np.all(np.asarray(out)[-1, 0, -1] == 0) and np.isneginf(np.asarray(got_lse)[-1, 0, -1])


@pytest.mark.parametrize("channels", [32, 16])
def test_combine_kernel_puts_interleaved_channels_back(channels):
  """O^T rows in the Mosaic int4 kernel's value order (`value_channel_order`) come out in channel order,
  whether a program owns two groups of 16 channels or one."""
  o, lse = _partials(1, 2, 9, 4, 8, 128, seed=1)
  want_out, want_lse = _want(o, lse, 9, 4)
  o_perm = np.ascontiguousarray(np.swapaxes(o, -1, -2)[..., value_channel_order(64), :])
  out, got_lse = combine.combine_partials(jnp.asarray(o_perm), jnp.asarray(lse), splits=9, g=4, layout="channels",
                                          interleave16=True, out_dtype=jnp.float32, interpret=True, channels=channels)
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_lse), want_lse, rtol=1e-6)


def test_nan_partial_stays_nan_and_bad_padding_is_refused():
  o, lse = _partials(1, 1, 4, 2, 8, 32, seed=2)
  o[0, 0, 1, 0, 3] = np.nan
  out, _ = combine.combine_partials(jnp.asarray(o), jnp.asarray(lse), splits=4, g=2, layout="rows",
                                    out_dtype=jnp.float32, interpret=True)
  assert np.isnan(np.asarray(out)[0, 0, 0, 3]) and not np.isnan(np.asarray(out)[0, 0, 1]).any()
  with pytest.raises(ValueError, match="padded_splits"):
    combine.combine_partials(jnp.asarray(o[:, :, :3]), jnp.asarray(lse[:, :, :3]), splits=3, g=2, layout="rows",
                             interpret=True)
  with pytest.raises(ValueError, match="at least 16 with interleave16"):
    combine.combine_partials(jnp.asarray(o), jnp.asarray(lse), splits=4, g=2, layout="channels", interleave16=True,
                             channels=8, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    combine.combine_partials(jnp.asarray(o), jnp.asarray(lse), splits=4, g=3, layout="rows", interpret=True)
