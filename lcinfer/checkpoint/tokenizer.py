"""Tokenizers from a checkpoint directory: HF `tokenizer.json` (through the `tokenizers` library,
the same code transformers' fast tokenizers run) or a sentencepiece `tokenizer.model`, with the
BOS/EOS tokens and the Jinja chat template of `tokenizer_config.json`.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Sequence

from lcinfer.errors import CheckpointError


def _token_str(v: Any) -> str | None:
  if isinstance(v, dict):
    return v.get("content")
  return v


class Tokenizer:
  """encode / decode / apply_chat_template, with bos/eos ids."""

  def __init__(self, *, encode_fn, decode_fn, token_to_id, bos_token, eos_token, chat_template, add_bos: bool,
               add_eos: bool, special_added: bool, vocab_size: int, extra_special: dict[str, str]):
    self._encode, self._decode, self._tok2id = encode_fn, decode_fn, token_to_id
    self.bos_token, self.eos_token = bos_token, eos_token
    self.bos_token_id = token_to_id(bos_token) if bos_token else None
    self.eos_token_id = token_to_id(eos_token) if eos_token else None
    self.chat_template = chat_template
    self.add_bos, self.add_eos = add_bos, add_eos
    self._special_added = special_added  # the backend adds BOS/EOS itself (tokenizer.json post-processor)
    self.vocab_size = vocab_size
    self.extra_special = extra_special

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = list(self._encode(text, add_special_tokens and self._special_added))
    if add_special_tokens and not self._special_added:
      if self.add_bos and self.bos_token_id is not None:
        ids = [self.bos_token_id] + ids
      if self.add_eos and self.eos_token_id is not None:
        ids = ids + [self.eos_token_id]
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._decode([int(i) for i in ids], skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                          **kwargs):
    """Render `messages` with the checkpoint's Jinja template, as transformers does."""
    if not self.chat_template:
      raise CheckpointError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
    text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                **self.extra_special, **kwargs)
    return self.encode(text, add_special_tokens=False) if tokenize else text

  @staticmethod
  def from_dir(path: str | Path) -> "Tokenizer":
    d = Path(path)
    cfg = {}
    if (d / "tokenizer_config.json").exists():
      cfg = json.loads((d / "tokenizer_config.json").read_text())
    stm = json.loads((d / "special_tokens_map.json").read_text()) if (d / "special_tokens_map.json").exists() else {}
    bos = _token_str(cfg.get("bos_token", stm.get("bos_token")))
    eos = _token_str(cfg.get("eos_token", stm.get("eos_token")))
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if (d / "chat_template.jinja").exists():
      template = (d / "chat_template.jinja").read_text()
    extra = {k: _token_str(v) for k, v in cfg.items()
             if k.endswith("_token") and k not in ("bos_token", "eos_token") and _token_str(v) is not None}
    if (d / "tokenizer.json").exists():
      from tokenizers import Tokenizer as HFTok

      tok = HFTok.from_file(str(d / "tokenizer.json"))

      def tok2id(t):
        return tok.token_to_id(t)

      return Tokenizer(
          encode_fn=lambda s, special: tok.encode(s, add_special_tokens=special).ids,
          decode_fn=lambda ids, skip: tok.decode(ids, skip_special_tokens=skip),
          token_to_id=tok2id, bos_token=bos, eos_token=eos, chat_template=template,
          add_bos=bool(cfg.get("add_bos_token", False)), add_eos=bool(cfg.get("add_eos_token", False)),
          special_added=True, vocab_size=tok.get_vocab_size(), extra_special=extra)
    if (d / "tokenizer.model").exists():
      import sentencepiece as spm

      sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
      bos = bos or (sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None)
      eos = eos or (sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None)

      def sp_decode(ids, skip):
        if skip:
          ids = [i for i in ids if not sp.is_control(i)]
        return sp.decode(ids)

      return Tokenizer(
          encode_fn=lambda s, special: sp.encode(s), decode_fn=sp_decode,
          token_to_id=lambda t: None if sp.piece_to_id(t) == sp.unk_id() and t != sp.id_to_piece(sp.unk_id())
          else sp.piece_to_id(t),
          bos_token=bos, eos_token=eos, chat_template=template,
          add_bos=bool(cfg.get("add_bos_token", True)), add_eos=bool(cfg.get("add_eos_token", False)),
          special_added=False, vocab_size=sp.get_piece_size(), extra_special=extra)
    raise CheckpointError(f"{d} has no tokenizer.json or tokenizer.model")


def render_chat_template(template: str, messages, **context) -> str:
  """Jinja2 in a sandbox with transformers' settings (trim_blocks, lstrip_blocks, raise_exception)."""
  from jinja2.exceptions import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template).render(messages=messages, **context)
  except TemplateError as e:
    raise ValueError(f"chat template error: {e}") from None
