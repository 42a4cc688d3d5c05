"""The Llama family: Llama 2/3, Vicuna, Mistral and Yi decoders (HF LlamaForCausalLM /
MistralForCausalLM). Config: LlamaConfig; module: vlm.llama.Llama."""
from __future__ import annotations

import dataclasses
from typing import Optional

from vlm.errors import ConversionError
from vlm.families.family import HF, Family, WeightRule, linear


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama 2/3, Vicuna and Mistral decoders (HF LlamaForCausalLM / MistralForCausalLM)."""
  vocab_size: int = 32000
  hidden: int = 4096
  layers: int = 32
  heads: int = 32
  kv_heads: int = 32
  head_dim: int = 128
  mlp_dim: int = 11008
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) or None.
  rope_scaling: Optional[tuple] = None
  max_positions: int = 4096
  tie_embeddings: bool = False
  sliding_window: Optional[int] = None  # Mistral v0.1 only; v0.2+ has none
  family: str = "llama"  # its row in vlm/families (module + HF mapping)


# The decoder projections LoRA can target, in module order (vlm/llama.py names them so).
LLM_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# LoRA target name (LLM_PROJECTIONS, in order) -> HF module path in a decoder layer.
PROJECTIONS = dict(zip(LLM_PROJECTIONS, (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
LLAMA3_TOKENS = ("<|start_header_id|>", "<|eot_id|>")


def rules(c: LlamaConfig, lora_targets: tuple) -> list:
  """Names as inside LlamaModel ('layers.{i}.self_attn.q_proj.weight'), plus 'lm_head.weight'."""
  layer = ("layers", "layer")
  out = [WeightRule(("embed",), "embed_tokens.weight"),
         WeightRule(("norm", "scale"), "norm.weight"),
         WeightRule(layer + ("attn_norm", "scale"), "layers.{i}.input_layernorm.weight"),
         WeightRule(layer + ("mlp_norm", "scale"), "layers.{i}.post_attention_layernorm.weight")]
  if not c.tie_embeddings:
    out += linear(("lm_head",), "lm_head")
  for ours, hf in PROJECTIONS.items():
    sub = ("attn",) if ours in ("q", "k", "v", "o") else ("mlp",)
    out += linear(layer + sub + (ours,), f"layers.{{i}}.{hf}", lora=ours in lora_targets)
  return out


def read(d: dict) -> LlamaConfig:
  """A transformers Llama / Mistral config dict (rope keys of transformers 4 or 5)."""
  rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
  theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
  kind = rp.get("rope_type", rp.get("type", "default"))
  scaling = None
  if kind == "llama3":
    scaling = ("llama3", float(rp["factor"]), float(rp["low_freq_factor"]),
               float(rp["high_freq_factor"]), int(rp["original_max_position_embeddings"]))
  elif kind not in ("default", None):
    raise ConversionError(f"rope type {kind!r} is not supported (default | llama3)")
  heads = d["num_attention_heads"]
  return LlamaConfig(
      vocab_size=d["vocab_size"], hidden=d["hidden_size"], layers=d["num_hidden_layers"],
      heads=heads, kv_heads=d.get("num_key_value_heads") or heads,
      head_dim=d.get("head_dim") or d["hidden_size"] // heads, mlp_dim=d["intermediate_size"],
      norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
      max_positions=d.get("max_position_embeddings", 4096),
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      sliding_window=d.get("sliding_window") if d.get("model_type") == "mistral" else None)


def write(c: LlamaConfig) -> dict:
  """The text config transformers 5 writes (rope_parameters); a sliding window makes it Mistral."""
  text = {"vocab_size": c.vocab_size, "hidden_size": c.hidden, "num_hidden_layers": c.layers,
          "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
          "intermediate_size": c.mlp_dim, "rms_norm_eps": c.norm_eps,
          "max_position_embeddings": c.max_positions, "tie_word_embeddings": c.tie_embeddings,
          "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
          "model_type": "mistral" if c.sliding_window else "llama"}
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    _, factor, low, high, old = c.rope_scaling
    rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=old)
  text["rope_parameters"] = rope
  if c.sliding_window:
    text["sliding_window"] = c.sliding_window
  return text


def template(text: dict, tokens: Optional[set], vlm: bool, source: str) -> str:
  """Our template for a Llama / Mistral text config trained by the LLaVA family (`vlm`) or used
  on its own. Mistral is told by its model_type; model_type 'llama' covers Llama-2 / Vicuna,
  Llama-3 and Yi (LLaVA-1.6-34B), which only the tokenizer's special tokens tell apart
  (`tokens`; without tokenizer files Llama-3's bos id or vocabulary size is the hint)."""
  if text.get("model_type") == "mistral":
    # LLaVA / LLaVA-NeXT conv_mistral_instruct (LLAMA_2 style, system "") for LLaVA-1.6-Mistral
    # and LLaVA-Med v1.5; a bare Mistral speaks its own format (mistral-common)
    return "llava_mistral" if vlm else "mistral_instruct"
  tokens = tokens or set()
  if any(t in tokens for t in CHATML_TOKENS):
    raise ConversionError(f"{source}: a ChatML tokenizer ({CHATML_TOKENS[0]}): trained in "
                        "LLaVA's chatml_direct template (LLaVA-1.6-34B), which medvlm-jax does "
                        "not support")
  if (all(t in tokens for t in LLAMA3_TOKENS) or text.get("bos_token_id") == 128000
      or text.get("vocab_size", 0) >= 128000):   # the config's hints, for dirs without tokenizer
    return "llama3"
  return "vicuna_v1"


FAMILY = Family(
    name="llama", part="llm", config=LlamaConfig, module="vlm.llama:Llama",
    hf=HF(model_types={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"},
          rules=rules, read=read, write=write, projections=PROJECTIONS, template=template,
          tokens=CHATML_TOKENS + LLAMA3_TOKENS))
