"""Tokenizers against HF transformers' own encodings (fixtures), and sentencepiece trained here."""

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from conftest import FIXTURES
from lcinfer.checkpoint.tokenizer import Tokenizer

TOK = FIXTURES / "tokenizers"


@pytest.mark.parametrize("name", ["sp", "bpe"])
def test_encode_decode_match_hf(name):
  ref = json.loads((TOK / name / "reference.json").read_text())
  tok = Tokenizer.from_dir(TOK / name)
  assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == (
      ref["bos_token"], ref["bos_token_id"], ref["eos_token"], ref["eos_token_id"])
  for e in ref["encodings"]:
    assert tok.encode(e["text"]) == e["ids_with_special"], e["text"]
    assert tok.encode(e["text"], add_special_tokens=False) == e["ids_plain"], e["text"]
    assert tok.decode(e["ids_plain"]) == e["decoded"], e["text"]


@pytest.mark.parametrize("name", ["sp", "bpe"])
def test_chat_template_matches_hf(name):
  ref = json.loads((TOK / name / "reference.json").read_text())["chat"]
  tok = Tokenizer.from_dir(TOK / name)
  assert tok.apply_chat_template(ref["messages"], add_generation_prompt=True) == ref["rendered"]
  assert tok.apply_chat_template(ref["messages"], add_generation_prompt=True, tokenize=True) == ref["ids"]
  with pytest.raises(ValueError, match="chat template error"):
    tok.apply_chat_template([{"role": "wizard", "content": "hi"}])


def test_sentencepiece_model_alone(tmp_path):
  """Only tokenizer.model: sentencepiece itself encodes; BOS is added as Llama does."""
  ref = json.loads((TOK / "sp" / "reference.json").read_text())
  d = tmp_path / "sp"
  d.mkdir()
  shutil.copy(TOK / "sp" / "tokenizer.model", d)
  tok = Tokenizer.from_dir(d)
  for e in ref["encodings"]:
    assert tok.encode(e["text"], add_special_tokens=False) == e["ids_sentencepiece"]
    assert tok.encode(e["text"]) == [1] + e["ids_sentencepiece"]


def test_sentencepiece_trained_here_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "needle", "haystack", "key", "value", "café"]
  text = "\n".join(" ".join(rng.choice(words, 8)) + f" {i}." for i in range(300))
  (tmp_path / "corpus.txt").write_text(text)
  spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                 vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2)
  tok = Tokenizer.from_dir(tmp_path)
  s = "the needle is in the haystack: key 42 -> value ü"
  ids = tok.encode(s)
  assert ids[0] == tok.bos_token_id and tok.decode(ids) == s
