"""The Llama-family decoder (Llama 1-3, Mistral, Qwen2, Phi-3) in Flax NNX, parameters only.

Pre-norm decoder (Touvron et al. 2023): x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x)), SwiGLU MLP
down(act(gate(x)) * up(x)) (Shazeer 2020), RoPE on q and k (models/rope.py), GQA.
The module tree mirrors HF's parameter names ("model.layers.3.self_attn.q_proj.weight"), so
checkpoint conversion is the identity map on names. Family differences are config flags:
qkv bias (Qwen2), sliding window (Mistral, Qwen2 layer types, Phi-3), fused qkv_proj and
gate_up_proj (Phi-3), tied embeddings, explicit head_dim, partial rotary.

The KV cache is not state: `__call__` takes a `KVCache` (or None) and returns the updated one.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from lcinfer.config import ModelConfig, eos_ids, rope_from_hf
from lcinfer.errors import ConfigError
from lcinfer.kv.cache import KVCache, LayerKV
from lcinfer.models.layers import ACT, Embedding, Linear, RMSNorm
from lcinfer.models.rope import apply_rope, rope_cos_sin
from lcinfer.sharding import constrain


class Attention(nnx.Module):
  def __init__(self, c: ModelConfig, dtype, rngs: nnx.Rngs):
    e, h, k, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, d
    if c.fused_qkv:
      self.qkv_proj = Linear(e, (h + 2 * k) * d, bias=c.qkv_bias, axes=("qkv", "embed"), dtype=dtype, rngs=rngs)
    else:
      self.q_proj = Linear(e, h * d, bias=c.qkv_bias, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
      self.k_proj = Linear(e, k * d, bias=c.qkv_bias, axes=("kv_heads", "embed"), dtype=dtype, rngs=rngs)
      self.v_proj = Linear(e, k * d, bias=c.qkv_bias, axes=("kv_heads", "embed"), dtype=dtype, rngs=rngs)
    self.o_proj = Linear(h * d, e, bias=c.o_bias, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
    self.fused = c.fused_qkv

  def qkv(self, x_BTE):
    b, t, _ = x_BTE.shape
    h, k, d = self.num_heads, self.num_kv_heads, self.head_dim
    if self.fused:
      qkv = self.qkv_proj(x_BTE)
      q, kk, v = jnp.split(qkv, [h * d, (h + k) * d], axis=-1)
    else:
      q, kk, v = self.q_proj(x_BTE), self.k_proj(x_BTE), self.v_proj(x_BTE)
    return q.reshape(b, t, h, d), kk.reshape(b, t, k, d), v.reshape(b, t, k, d)

  def __call__(self, x_BTE, cos, sin, pos_BT, layer_cache: LayerKV | None, slot, *, attention, fresh: bool,
               window, seg_BT):
    q, k, v = self.qkv(x_BTE)
    q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
    scale = self.head_dim ** -0.5
    if layer_cache is not None:
      layer_cache = layer_cache.write(k, v, pos_BT, slot)
    if fresh:
      out, _ = attention.prefill(q, k, v, q_pos_BT=pos_BT, kv_pos_BS=pos_BT, scale=scale, window=window,
                                 q_seg_BT=seg_BT, kv_seg_BS=seg_BT, need_lse=False)
    else:
      out, _ = attention.decode(q, layer_cache.k, layer_cache.v, q_pos_BT=pos_BT, kv_pos_BKC=layer_cache.pos,
                                scale=scale, window=window)
    b, t = x_BTE.shape[:2]
    return self.o_proj(out.reshape(b, t, -1)), layer_cache


class MLP(nnx.Module):
  def __init__(self, c: ModelConfig, dtype, rngs: nnx.Rngs):
    e, f = c.hidden_size, c.intermediate_size
    if c.fused_gate_up:
      self.gate_up_proj = Linear(e, 2 * f, bias=c.mlp_bias, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    else:
      self.gate_proj = Linear(e, f, bias=c.mlp_bias, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
      self.up_proj = Linear(e, f, bias=c.mlp_bias, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.down_proj = Linear(f, e, bias=c.mlp_bias, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fused = c.fused_gate_up
    self.act = c.hidden_act

  def __call__(self, x):
    if self.fused:
      gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(ACT[self.act](gate) * up)


class DecoderLayer(nnx.Module):
  def __init__(self, c: ModelConfig, window: int | None, dtype, rngs: nnx.Rngs):
    self.self_attn = Attention(c, dtype, rngs)
    self.mlp = MLP(c, dtype, rngs)
    self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
    self.window = window

  def __call__(self, x, cos, sin, pos_BT, layer_cache, slot, *, attention, fresh, seg_BT):
    a, layer_cache = self.self_attn(self.input_layernorm(x), cos, sin, pos_BT, layer_cache, slot,
                                    attention=attention, fresh=fresh, window=self.window, seg_BT=seg_BT)
    x = x + a
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, ("batch", "seq", "act_embed")), layer_cache


class LlamaModel(nnx.Module):
  def __init__(self, c: ModelConfig, dtype, rngs: nnx.Rngs):
    self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype, rngs)
    self.layers = nnx.List([DecoderLayer(c, c.layer_windows[i], dtype, rngs) for i in range(c.num_layers)])
    self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)


class Llama(nnx.Module):
  """LlamaForCausalLM and its relatives. `dtype` is the parameter and activation dtype."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, dtype, rngs)
    self.lm_head = None if config.tie_word_embeddings else Linear(
        config.hidden_size, config.vocab_size, bias=False, axes=("vocab", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, tokens_BT, positions_BT, *, attention, cache: KVCache | None = None, fresh: bool = True,
               segment_ids_BT=None):
    """Final hidden states [B, T, E] (after the last norm) and the updated cache.

    positions_BT: RoPE position of each token, -1 for padding. fresh=True: attention over this
    call's own tokens only (a prefill with nothing before it in the cache); fresh=False: the
    tokens are written to the cache at `cache.write_index` first and attend over the whole cache.
    """
    x = self.model.embed_tokens(jnp.maximum(tokens_BT, 0))
    x = constrain(x, ("batch", "seq", "act_embed"))
    cos, sin = rope_cos_sin(self.config, positions_BT, x.dtype)
    slot = None if cache is None else cache.write_index
    new_layers = []
    for i, layer in enumerate(self.model.layers):
      lc = None if cache is None else cache.layers[i]
      x, lc = layer(x, cos, sin, positions_BT, lc, slot, attention=attention, fresh=fresh, seg_BT=segment_ids_BT)
      new_layers.append(lc)
    x = self.model.norm(x)
    if cache is not None:
      t = tokens_BT.shape[1]
      last = jnp.max(positions_BT, axis=1)
      next_pos = jnp.where(last >= 0, last + 1, cache.next_pos)
      cache = KVCache(layers=tuple(new_layers), write_index=cache.write_index + t, next_pos=next_pos)
    return x, cache

  def logits(self, hidden_xE):
    """Vocabulary logits in float32 for hidden states of any leading shape."""
    if self.lm_head is None:
      out = self.model.embed_tokens.attend(hidden_xE)
    else:
      out = self.lm_head(hidden_xE)
    return out.astype(jnp.float32)


# -- HF config -> ModelConfig ---------------------------------------------------------------------
def config_from_hf(d: dict[str, Any]) -> ModelConfig:
  mt = d["model_type"]
  if d.get("quantization_config"):
    raise ConfigError("config field 'quantization_config': quantized checkpoints are not supported; "
                      "load an unquantized (bf16/fp16/fp32) checkpoint")
  for req in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
    if req not in d:
      raise ConfigError(f"config field '{req}': missing (model_type {mt!r})")
  h = d["num_attention_heads"]
  kvh = d.get("num_key_value_heads") or h
  head_dim = d.get("head_dim") or d["hidden_size"] // h
  n = d["num_hidden_layers"]
  window = d.get("sliding_window")
  if mt == "llama":
    window = None
  if mt == "qwen2" and not d.get("use_sliding_window", False):
    window = None
  if d.get("layer_types"):
    lt = d["layer_types"]
    bad = [x for x in lt if x not in ("full_attention", "sliding_attention")]
    if bad:
      raise ConfigError(f"config field 'layer_types': unsupported value {bad[0]!r}")
    windows = tuple(window if x == "sliding_attention" else None for x in lt)
  elif mt == "qwen2" and window is not None:
    mwl = d.get("max_window_layers", n)
    windows = tuple(window if i >= mwl else None for i in range(n))
  else:
    windows = (window,) * n
  fused = mt == "phi3"
  attention_bias = bool(d.get("attention_bias", False))
  return ModelConfig(
      model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"], num_layers=n, num_heads=h, num_kv_heads=kvh, head_dim=head_dim,
      max_position_embeddings=d.get("max_position_embeddings", 2048),
      rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope=rope_from_hf(d), hidden_act=d.get("hidden_act", "silu"),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      qkv_bias=True if mt == "qwen2" else (attention_bias if mt == "llama" else False),
      o_bias=attention_bias if mt == "llama" else False,
      mlp_bias=bool(d.get("mlp_bias", False)) if mt == "llama" else False,
      fused_qkv=fused, fused_gate_up=fused, layer_windows=windows,
      bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids(d.get("eos_token_id")),
      pad_token_id=d.get("pad_token_id"), dtype=d.get("torch_dtype") or d.get("dtype"))


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
  """An HF config.json (v4 `rope_scaling` format, which every transformers version reads)."""
  d: dict[str, Any] = {
      "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}[c.model_type]],
      "model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
      "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
      "hidden_act": c.hidden_act, "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": c.rope.theta,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) > 1 else (c.eos_token_ids or [None])[0],
  }
  if c.pad_token_id is not None:
    d["pad_token_id"] = c.pad_token_id
  if c.model_type == "llama":
    d["attention_bias"], d["mlp_bias"] = c.qkv_bias, c.mlp_bias
  if c.sliding_window is not None:
    d["sliding_window"] = c.sliding_window
    if c.model_type == "qwen2":
      d["use_sliding_window"] = True
  if len(set(c.layer_windows)) > 1:
    d["sliding_window"] = next(w for w in c.layer_windows if w is not None)
    d["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in c.layer_windows]
    if c.model_type == "qwen2":
      d["use_sliding_window"] = True
  if c.rope.partial_rotary_factor != 1.0:
    d["partial_rotary_factor"] = c.rope.partial_rotary_factor
  if c.rope.rope_type != "default":
    r = {k: v for k, v in c.rope.__dict__.items()
         if v is not None and k not in ("theta", "partial_rotary_factor", "rope_type")
         and (k != "truncate" or c.rope.rope_type == "yarn")}
    r = {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
    r["rope_type"] = r["type"] = c.rope.rope_type
    if c.model_type == "phi3" and c.rope.original_max_position_embeddings is not None:
      d["original_max_position_embeddings"] = c.rope.original_max_position_embeddings
    d["rope_scaling"] = r
  if c.dtype:
    d["torch_dtype"] = c.dtype
  return d
