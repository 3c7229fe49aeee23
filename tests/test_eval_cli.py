"""`lcinfer eval`: grid, JSON, heatmaps, comparison table, and its bad-input paths."""

import json

import pytest
import sentencepiece as spm

import lcinfer
from helpers import TINY
from lcinfer.checkpoint import params as P
from lcinfer.checkpoint.safetensors_io import write_safetensors
from lcinfer.cli import main
from lcinfer.eval import training_corpus


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("evalmodel")
  (d / "corpus.txt").write_text(training_corpus(200_000, seed=0))
  spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=512,
                                 model_type="bpe", byte_fallback=True, split_digits=True, minloglevel=2)
  (d / "corpus.txt").unlink()
  (d / "tokenizer.vocab").unlink()
  cfg = {**TINY, "vocab_size": 512, "max_position_embeddings": 1024}
  llm = lcinfer.LLM.random(lcinfer.ModelConfig.from_hf(cfg), seed=0)
  write_safetensors(P.state_to_arrays(llm.params), d)
  (d / "config.json").write_text(json.dumps(cfg))
  return d


def test_eval_grid_writes_json_heatmaps_and_table(model_dir, tmp_path, capsys):
  out = tmp_path / "out"
  assert main(["eval", "niah_single,vt", "--model", str(model_dir), "--lengths", "256,512", "--depths", "3",
               "--attention", "dense,auto", "--out", str(out), "--dtype", "float32"]) == 0
  printed = capsys.readouterr().out
  assert "| method | 256 | 512 | mean acc | mean TTFT s | KV MB @ max |" in printed
  res = json.loads((out / "results-niah_single+vt.json").read_text())
  assert [r["task"] for r in res] == ["niah_single", "vt"]
  cells = res[0]["cells"]
  assert len(cells) == 2 * 2 * 3  # methods x lengths x depths
  for c in cells:
    assert 0.0 <= c["accuracy"] <= 1.0 and c["ttft_s"] > 0 and c["prompt_tokens"] <= c["length"] + 1  # + BOS
    assert c["kv_bytes"] == c["prompt_tokens"] * 2 * 2 * 2 * 16 * 4  # K+V x layers x kv heads x head_dim x f32
  for name in ("heatmap-niah_single-dense.png", "heatmap-niah_single-auto.png", "heatmap-vt-dense.png",
               "summary-niah_single+vt.md"):
    assert (out / name).stat().st_size > 0
  assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args,message", [
    (["nope_task"], "unknown task 'nope_task'; available tasks: cwe"),
    (["niah_single", "--attention", "flash9"], "unknown attention method 'flash9'; available: auto, cudnn, dense"),
    (["niah_single", "--kv-press", "snapkv"], "unknown kv press 'snapkv'; available: none"),
    (["niah_single", "--lengths", "2k"], "exceed the model's capacity (1024 positions"),
])
def test_eval_bad_input(model_dir, tmp_path, capsys, args, message):
  out = tmp_path / "out"
  assert main(["eval", *args[:1], "--model", str(model_dir), "--out", str(out), *args[1:]]) == 2
  assert message in capsys.readouterr().err
  assert not out.exists() or not any(out.iterdir())


def test_eval_unwritable_output(model_dir, tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  assert main(["eval", "niah_single", "--model", str(model_dir), "--out", str(blocker / "sub")]) == 2
  assert "is not writable" in capsys.readouterr().err


def test_eval_corrupt_checkpoint(model_dir, tmp_path, capsys):
  import shutil

  bad = tmp_path / "bad"
  shutil.copytree(model_dir, bad)
  f = bad / "model.safetensors"
  f.write_bytes(f.read_bytes()[:1000])
  assert main(["eval", "niah_single", "--model", str(bad), "--out", str(tmp_path / "out")]) == 2
  assert "not a readable safetensors file" in capsys.readouterr().err
  assert not any((tmp_path / "out").iterdir())
