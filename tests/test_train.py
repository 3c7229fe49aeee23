"""The training loop: loss goes down, gradient accumulation is exact, a SIGKILLed run resumes
bit-exactly (params, optimizer, rng and data position), a 2x2 mesh matches one device, and bad
configs or incompatible checkpoints fail with errors that name the problem.

Every run shares one tiny model and (where possible) one step configuration, so the train step
compiles a handful of times for the whole file.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config
from lcinfer.errors import ConfigError
from lcinfer.models import build_model
from lcinfer.sharding import make_mesh
from lcinfer.train import (TRACES, CallableSource, SyntheticCopySource, TrainConfig, Trainer, make_schedule,
                           read_metrics, train)

MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
# One step configuration for most tests (bookkeeping fields do not change the compiled step).
BASE = TrainConfig(learning_rate=1e-2, warmup_steps=2, total_steps=30, schedule="cosine", weight_decay=0.1,
                   grad_clip_norm=1.0, batch_size=4, seq_len=32, seed=0, log_every=1)


def tiny_model(seed=0, **over):
  return build_model(tiny_config(**{**MODEL, **over}), dtype=jnp.float32, rngs=nnx.Rngs(seed))


def copy_data(batch=4, seed=1):
  return SyntheticCopySource(MODEL["vocab_size"], batch, BASE.seq_len, seed=seed)


def run(config, model=None, data=None, **kw):
  return train(config, tiny_model() if model is None else model, copy_data() if data is None else data,
               progress=False, log=None, **kw)


def host_leaves(params):
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_loss_decreases_and_step_compiles_once():
  before = TRACES["train_step"]
  res = run(BASE)
  losses = [r["loss"] for r in res.history]
  assert [r["step"] for r in res.history] == list(range(1, 31))
  # Unigram statistics alone (Zipf tokens) take ~0.8 nats off the initial log(64) = 4.16.
  assert np.mean(losses[-5:]) < losses[0] - 0.5, losses
  assert TRACES["train_step"] - before <= 1
  rec = res.history[-1]
  assert set(rec) >= {"step", "loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
  assert rec["lr"] == pytest.approx(float(make_schedule(BASE)(29)))


def test_gradient_accumulation_matches_one_big_batch():
  # Both runs read the same 8 rows per step: the source serves the global batch, the trainer splits it.
  data = copy_data(batch=8, seed=3)
  cfg = TrainConfig(learning_rate=1e-4, total_steps=1, batch_size=8, grad_accum_steps=1, seq_len=32,
                    weight_decay=0.1)
  big = run(cfg, data=data)
  acc = run(cfg.replace(batch_size=4, grad_accum_steps=2), data=data)
  (b,), (a,) = big.history, acc.history
  assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
  assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)  # Adam is scale-free: check the scale here
  assert a["weight"] == b["weight"] == 8 * 15  # 15 copied targets per row
  init = host_leaves(nnx.split(tiny_model())[1])
  moved = max(np.max(np.abs(x - y)) for x, y in zip(host_leaves(big.params), init))
  assert moved > 5e-5
  # Adam's first update is ~lr * sign(g): a near-zero gradient entry whose sign depends on float32
  # summation order can differ by up to ~lr, hence the small learning rate above.
  for x, y in zip(host_leaves(acc.params), host_leaves(big.params)):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


RESUME_SCRIPT = """
import os, signal, sys
import jax.numpy as jnp
from flax import nnx
from helpers import tiny_config
from lcinfer.models import build_model
from lcinfer.train import SyntheticCopySource, TrainConfig, train

cfg = TrainConfig.from_dict({config})
model = build_model(tiny_config(**{model}), dtype=jnp.float32, rngs=nnx.Rngs(0))
data = SyntheticCopySource({vocab}, cfg.global_batch_size, cfg.seq_len, seed=1)

def die(trainer, step):
  if step == {kill_at}:  # step {kill_at} is done and logged; only its predecessor's save is on disk
    trainer.wait()
    os.kill(os.getpid(), signal.SIGKILL)

train(cfg, model, data, on_step=die, progress=False, log=None)
"""


def test_sigkill_then_resume_is_bit_exact(tmp_path):
  cfg = BASE.replace(save_every=2, keep_checkpoints=2)
  ref_cfg = cfg.replace(checkpoint_dir=str(tmp_path / "ref"), metrics_path=str(tmp_path / "ref.jsonl"))
  ref = run(ref_cfg)
  assert sorted(int(p.name) for p in (tmp_path / "ref").iterdir() if p.name.isdigit()) == [28, 30]

  ck, mp = tmp_path / "ck", tmp_path / "metrics.jsonl"
  kcfg = cfg.replace(checkpoint_dir=str(ck), metrics_path=str(mp))
  script = RESUME_SCRIPT.format(config=repr(kcfg.to_dict()), model=repr({**MODEL}), vocab=MODEL["vocab_size"],
                                kill_at=5)
  root = Path(__file__).resolve().parents[1]
  path = [str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
  proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, out.decode()[-3000:]
  assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [2, 4]
  assert [r["step"] for r in read_metrics(mp)] == [1, 2, 3, 4, 5]  # step 5 ran but was never saved

  resumed = run(kcfg)
  assert resumed.start_step == 4 and resumed.step == 30
  assert [r["step"] for r in resumed.history] == list(range(5, 31))
  # The file drops the orphaned step-5 record and holds one trajectory: bit-identical to the reference.
  got = [(r["step"], r["loss"], r["accuracy"], r["grad_norm"], r["lr"]) for r in read_metrics(mp)]
  want = [(r["step"], r["loss"], r["accuracy"], r["grad_norm"], r["lr"]) for r in read_metrics(ref_cfg.metrics_path)]
  assert got == want
  for x, y in zip(host_leaves(resumed.params), host_leaves(ref.params)):
    np.testing.assert_array_equal(x, y)
  assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [28, 30]  # keep-N
  # A finished run restores and returns at once.
  again = run(kcfg)
  assert again.start_step == again.step == 30 and again.history == []


def test_incompatible_checkpoint_is_refused(tmp_path):
  cfg = BASE.replace(checkpoint_dir=str(tmp_path / "ck"))
  res = run(cfg, on_step=lambda trainer, step: step == 2)  # stop early; the last step is still saved
  assert res.step == 2
  with pytest.raises(ConfigError, match="different model .*hidden_size: checkpoint 32, model 48"):
    Trainer(cfg, tiny_model(hidden_size=48), copy_data(), progress=False)
  with pytest.raises(ConfigError, match="train config field 'batch_size'.*batch_size=4.*batch_size=8"):
    Trainer(cfg.replace(batch_size=8), tiny_model(), copy_data(8), progress=False)
  with pytest.raises(ConfigError, match="trainable filter differs"):
    Trainer(cfg, tiny_model(), copy_data(), trainable=lambda name, v: "mlp" in name, progress=False)
  with pytest.warns(UserWarning, match="changed optimizer config.*learning_rate"):
    Trainer(cfg.replace(learning_rate=1e-3), tiny_model(), copy_data(), progress=False).close()


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (CPU: --xla_force_host_platform_device_count)")
def test_mesh_matches_single_device():
  single = run(BASE)
  mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
  sharded = run(BASE, mesh=mesh)
  np.testing.assert_allclose([r["loss"] for r in sharded.history], [r["loss"] for r in single.history],
                             atol=1e-5, rtol=0)
  q = sharded.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].get_value()
  assert tuple(q.sharding.spec) == ("tensor", None) and len(q.sharding.device_set) == 4


def test_mesh_restore_places_arrays_on_the_mesh(tmp_path):
  cfg = BASE.replace(checkpoint_dir=str(tmp_path / "ck"))
  run(cfg, on_step=lambda trainer, step: step == 1)
  mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
  tr = Trainer(cfg, tiny_model(), copy_data(), mesh=mesh, progress=False, log=None)
  try:
    assert tr.step == 1
    w = tr.train_params["model"]["layers"][1]["mlp"]["up_proj"]["weight"].get_value()
    assert w.sharding.mesh == mesh and tuple(w.sharding.spec) == ("tensor", None)
    mu = tr.opt_state[1][0].mu["model"]["layers"][1]["mlp"]["up_proj"]["weight"].get_value()
    assert tuple(mu.sharding.spec) == ("tensor", None)
  finally:
    tr.close()


def test_partial_training_in_bfloat16():
  # What SwiftKV / DuoAttention recipes need: train a subset, the rest frozen (no grads, no optimizer state).
  model = tiny_model()
  tr = Trainer(BASE.replace(total_steps=3, dtype="bfloat16"), model, copy_data(),
               trainable=lambda name, v: "mlp" in name, progress=False, log=None)
  res = tr.run()
  tr.close()
  init = {n: np.asarray(v.get_value()) for n, v in nnx.to_flat_state(nnx.split(model)[1])}
  final = {n: np.asarray(v.get_value()) for n, v in nnx.to_flat_state(res.params)}
  assert init.keys() == final.keys()
  for path in init:
    assert final[path].dtype == jnp.bfloat16
    same = np.array_equal(final[path], init[path].astype(jnp.bfloat16))
    assert same != ("mlp" in path), path
  moments = tr.opt_state[1][0].mu
  assert all("mlp" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(moments))


@pytest.mark.parametrize("field,value,message", [
    ("learning_rate", 0.0, "must be a number > 0"),
    ("warmup_steps", 31, "must not exceed total_steps"),
    ("total_steps", 0, "integer >= 1"),
    ("schedule", "step", "unsupported value 'step'"),
    ("min_lr_ratio", 1.5, r"must be in \[0, 1\]"),
    ("weight_decay", -0.1, "must be >= 0"),
    ("b2", 1.0, r"must be in \[0, 1\)"),
    ("grad_clip_norm", -1.0, "0 disables clipping"),
    ("batch_size", 0, "integer >= 1"),
    ("grad_accum_steps", 1.5, "integer >= 1"),
    ("seq_len", 1, "integer >= 2"),
    ("save_every", True, "integer >= 1"),
    ("keep_checkpoints", 0, "or None"),
    ("log_every", 0, "integer >= 1"),
    ("dtype", "float16", "unsupported value 'float16'"),
    ("checkpoint_dir", "", "must be a path"),
])
def test_bad_config_names_the_field(field, value, message):
  with pytest.raises(ConfigError, match=f"train config field '{field}': .*{message}"):
    BASE.replace(**{field: value})


def test_bad_batches_are_reported():
  cfg = BASE  # each fails at step 0, before anything compiles
  wrong_shape = CallableSource(lambda rng, step: {"tokens": rng.integers(0, 64, (3, 32))})
  with pytest.raises(ValueError, match=r"'tokens' has shape \(3, 32\); .* = \(4, 32\)"):
    run(cfg, data=wrong_shape)
  typo = CallableSource(lambda rng, step: {"tokens": rng.integers(0, 64, (4, 32)), "lossmask": np.ones((4, 32))})
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['lossmask'\]"):
    run(cfg, data=typo)
  out_of_vocab = CallableSource(lambda rng, step: {"tokens": np.full((4, 32), 64)})
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
    run(cfg, data=out_of_vocab)


def test_data_is_a_pure_function_of_seed_and_step():
  a, b = copy_data(seed=5), copy_data(seed=5)
  np.testing.assert_array_equal(a.batch(7)["tokens"], b.batch(7)["tokens"])
  assert not np.array_equal(a.batch(7)["tokens"], a.batch(8)["tokens"])
  t = a.batch(0)["tokens"]
  np.testing.assert_array_equal(t[:, :16], t[:, 16:])  # the copy
  keys = CallableSource(lambda key, step: {"tokens": jax.random.randint(key, (4, 32), 0, 64)}, seed=2, rng="jax")
  np.testing.assert_array_equal(keys.batch(3)["tokens"], keys.batch(3)["tokens"])


def test_schedule_shapes():
  cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
  cos = make_schedule(cfg)
  assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5) and float(cos(10)) == pytest.approx(1.0)
  assert float(cos(60)) == pytest.approx(0.55) and float(cos(110)) == pytest.approx(0.1)
  lin = make_schedule(cfg.replace(schedule="linear"))
  assert float(lin(60)) == pytest.approx(0.55) and float(lin(110)) == pytest.approx(0.1)
  assert float(make_schedule(cfg.replace(schedule="constant"))(100)) == pytest.approx(1.0)
