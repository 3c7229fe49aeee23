"""The shipped-model recipe: reproducible tokenizer, deterministic task batches, an end-to-end run."""

import numpy as np
import yaml

import lcinfer
from lcinfer.checkpoint.tokenizer import Tokenizer
from lcinfer.demo import shipped_model_path
from lcinfer.train.retrieval import TaskMixtureSource, run_recipe, train_tokenizer


def test_tokenizer_is_reproducible_from_the_recipe(tmp_path):
  cfg = yaml.safe_load(open("configs/retrieval_model.yaml"))["tokenizer"]
  train_tokenizer(tmp_path, **cfg)
  assert (tmp_path / "tokenizer.model").read_bytes() == (shipped_model_path() / "tokenizer.model").read_bytes()


def test_task_batches_are_deterministic_and_mask_the_answers():
  src = TaskMixtureSource(str(shipped_model_path()), rows=2, seq_len=2048, min_len=256, lm_weight=0.05, seed=3)
  a, b, c = src.batch(7), src.batch(7), src.batch(8)
  assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["tokens"], c["tokens"])
  tok = Tokenizer.from_dir(shipped_model_path())
  row, mask, pos = a["tokens"][0], a["loss_mask"][0], a["positions"][0]
  n = int((pos >= 0).sum())
  assert np.array_equal(pos[:n], np.arange(n)) and np.all(mask[n:] == 0)
  answer_ids = row[mask == 1.0]
  assert tok.eos_token_id in answer_ids.tolist()  # each sample's answer ends with EOS
  first = answer_ids[: answer_ids.tolist().index(tok.eos_token_id)]
  text = tok.decode(row[:n].tolist())
  assert tok.decode(first.tolist()).strip() in text.split("\nAnswer:")[1]  # the answer follows the prefix
  assert np.allclose(np.unique(mask[:n]), [0.0, 0.05, 1.0])


def test_recipe_end_to_end_tiny(tmp_path):
  cfg = yaml.safe_load(open("configs/retrieval_model.yaml"))
  cfg["model"].update(hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, intermediate=128, max_positions=1024)
  cfg["data"].update(rows=2, seq_len=512)
  (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
  (tmp_path / "out" / "model").mkdir(parents=True)
  for f in ("tokenizer.model", "tokenizer_config.json"):  # skip tokenizer training
    (tmp_path / "out" / "model" / f).write_bytes((shipped_model_path() / f).read_bytes())
  model_dir = run_recipe(tmp_path / "r.yaml", tmp_path / "out", total_steps=2, workers=1, progress=False)
  llm = lcinfer.load(model_dir, dtype="float32")
  assert llm.config.hidden_size == 64 and llm.tokenizer.vocab_size == 1024
  assert (tmp_path / "out" / "metrics.jsonl").exists() and (model_dir / "recipe.yaml").exists()
