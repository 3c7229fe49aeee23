"""convert / export / load, and every kind of bad input, through the CLI and the API."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import lcinfer
from conftest import FIXTURES
from lcinfer.checkpoint import convert, export
from lcinfer.checkpoint.safetensors_io import INDEX_NAME, write_safetensors
from lcinfer.cli import main
from lcinfer.errors import CheckpointError, ConfigError, OutputExistsError

CASE = FIXTURES / "llama_llama3_gqa"


def _copy_case(tmp_path, case=CASE) -> Path:
  d = tmp_path / "hf"
  shutil.copytree(case, d, ignore=shutil.ignore_patterns("reference.npz", "trained"))
  return d


def _only(tmp_path, *names):
  """The directory holds exactly these entries: nothing partial was left behind."""
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


@pytest.mark.parametrize("case", ["llama_llama3_gqa", "llama_tied_linear", "phi3_longrope"])
def test_convert_export_round_trip_is_bit_exact(tmp_path, case):
  ck, back = tmp_path / "ck", tmp_path / "back"
  assert main(["convert", str(FIXTURES / case), str(ck)]) == 0
  assert json.loads((ck / "lcinfer.json").read_text())["dtype"] == "float32"
  assert main(["export", str(ck), str(back)]) == 0
  a, b = load_file(FIXTURES / case / "model.safetensors"), load_file(back / "model.safetensors")
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  assert (back / "config.json").read_bytes() == (FIXTURES / case / "config.json").read_bytes()


def test_load_hf_dir_and_converted_give_identical_logits(tmp_path):
  ck = convert(CASE, tmp_path / "ck")
  ids = np.load(CASE / "reference.npz")["input_ids"]
  a = lcinfer.load(CASE, dtype="float32").logits(ids)
  b = lcinfer.load(ck, dtype="float32").logits(ids)
  assert np.array_equal(a, b)
  c = lcinfer.load(convert(CASE, tmp_path / "ck16", dtype="bfloat16"), dtype="bfloat16").logits(ids)
  d = lcinfer.load(CASE, dtype="bfloat16").logits(ids)
  assert np.array_equal(c, d)


def test_restore_onto_a_mesh(tmp_path):
  from lcinfer.sharding import make_mesh
  import jax

  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices")
  ck = convert(CASE, tmp_path / "ck")
  mesh = make_mesh({"tensor": 2}, jax.devices()[:2])
  llm = lcinfer.load(ck, dtype="float32", mesh=mesh)
  w = llm.params["model"]["layers"][0]["mlp"]["gate_proj"]["weight"].get_value()
  assert w.sharding.spec[0] == "tensor" and len(w.sharding.device_set) == 2
  ids = np.load(CASE / "reference.npz")["input_ids"]
  np.testing.assert_allclose(llm.logits(ids), lcinfer.load(CASE, dtype="float32").logits(ids), atol=1e-5)


def test_sharded_safetensors_with_index(tmp_path):
  d = _copy_case(tmp_path)
  tensors = load_file(d / "model.safetensors")
  (d / "model.safetensors").unlink()
  files = write_safetensors(tensors, d, max_shard_bytes=200_000)
  assert len(files) > 1 and (d / INDEX_NAME).exists()
  ids = np.load(CASE / "reference.npz")["input_ids"]
  assert np.array_equal(lcinfer.load(d, dtype="float32").logits(ids), lcinfer.load(CASE, dtype="float32").logits(ids))


def _edit_tensors(d: Path, fn):
  t = load_file(d / "model.safetensors")
  fn(t)
  write_safetensors(t, d)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)),
     "unexpected tensor model.layers.0.extra.weight"),
    (lambda t: t.__setitem__("model.norm.weight", np.zeros(7, np.float32)),
     r"tensor model.norm.weight has shape \(7,\), the config implies \(64,\)"),
])
def test_bad_tensors_are_all_reported_and_nothing_is_written(tmp_path, edit, message, capsys):
  d = _copy_case(tmp_path)
  _edit_tensors(d, edit)
  assert main(["convert", str(d), str(tmp_path / "out")]) != 0
  assert len(pytest.importorskip("re").findall(message, capsys.readouterr().err)) == 1
  _only(tmp_path, "hf")
  with pytest.raises(CheckpointError, match=message):
    lcinfer.load(d)


def test_several_problems_are_reported_together(tmp_path):
  d = _copy_case(tmp_path)
  _edit_tensors(d, lambda t: (t.pop("lm_head.weight"), t.__setitem__("bogus", np.ones(2, np.float32))))
  with pytest.raises(CheckpointError, match="2 problem") as e:
    convert(d, tmp_path / "out")
  assert "missing tensor lm_head.weight" in str(e.value) and "unexpected tensor bogus" in str(e.value)


def test_truncated_safetensors(tmp_path, capsys):
  d = _copy_case(tmp_path)
  f = d / "model.safetensors"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  assert main(["convert", str(d), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "model.safetensors is not a readable safetensors file" in err and "truncated" in err
  _only(tmp_path, "hf")


def test_unknown_model_type(tmp_path, capsys):
  d = _copy_case(tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"] = "gpt_neox"
  (d / "config.json").write_text(json.dumps(cfg))
  assert main(["convert", str(d), str(tmp_path / "out")]) == 2
  assert "unsupported value 'gpt_neox'; supported: llama, mistral, phi3, qwen2" in capsys.readouterr().err
  _only(tmp_path, "hf")


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path, capsys):
  d = _copy_case(tmp_path)
  (d / "model.safetensors").unlink()
  # a pickle that would create a file if it were ever loaded
  marker = tmp_path / "pwned"
  (d / "pytorch_model.bin").write_bytes(
      b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
  assert main(["convert", str(d), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "only pickle weights (pytorch_model.bin)" in err and "save_pretrained" in err
  assert not marker.exists()
  _only(tmp_path, "hf")


def test_existing_output_is_refused_unless_force(tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert main(["convert", str(CASE), str(out)]) == 2
  assert "already exists; pass --force" in capsys.readouterr().err
  assert (out / "keep.txt").read_text() == "mine"
  assert main(["convert", str(CASE), str(out), "--force"]) == 0
  assert (out / "lcinfer.json").exists() and not (out / "keep.txt").exists()
  _only(tmp_path, "out")
  with pytest.raises(OutputExistsError):
    export(out, out)


def test_prompt_longer_than_capacity_on_cli_and_api(tmp_path, capsys):
  assert main(["generate", str(CASE), "--prompt-ids", ",".join(["5"] * 40), "--max-new-tokens", "4",
               "--dtype", "float32", "--ids", "--capacity", "32"]) == 2
  assert "exceeds the cache capacity 32" in capsys.readouterr().err
  llm = lcinfer.load(CASE, dtype="float32")
  with pytest.raises(lcinfer.CapacityError, match="exceeds the cache capacity 32"):
    llm.generate([np.full(40, 5, np.int32)], max_new_tokens=4, capacity=32)


def test_cli_generate_matches_api(capsys):
  ref = np.load(CASE / "reference.npz")
  ids = ",".join(str(int(x)) for x in ref["greedy_prompt"])
  assert main(["generate", str(CASE), "--prompt-ids", ids, "--max-new-tokens", "24", "--dtype", "float32",
               "--stop", "", "--ids"]) == 0
  printed = [int(x) for x in capsys.readouterr().out.split()]
  assert printed == ref["greedy_tokens"].tolist()


def test_corrupt_converted_checkpoint(tmp_path):
  ck = convert(CASE, tmp_path / "ck")
  shutil.rmtree(ck / "params" / "d")
  with pytest.raises(CheckpointError, match="corrupt or incomplete"):
    lcinfer.load(ck)
  (ck / "lcinfer.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="lcinfer.json is unreadable"):
    lcinfer.load(ck)


def test_bad_dtype_and_missing_dir(tmp_path):
  with pytest.raises(ConfigError, match="dtype 'int8' is not supported"):
    lcinfer.load(CASE, dtype="int8")
  with pytest.raises(CheckpointError, match="does not exist"):
    lcinfer.load(tmp_path / "nope")
