"""vlm/families is the one place a model family is defined: a toy decoder registered as one row
runs, saves, loads and converts through the generic code; every registered family's HF mapping
covers its module's parameter tree and round-trips its config; an unknown name is one line."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from convert import hf
from vlm import hf as vlm_hf
from vlm import families
from vlm.config import LlamaConfig, LoraConfig, TilerConfig, VisionConfig, VLMConfig
from vlm.families.module import Part
from vlm.lora import Dense
from vlm.model import VLM, abstract_params, init_params

# A tiny config of every registered family: a new family adds its own here.
TINY = {
    ("llm", "llama"): LlamaConfig(vocab_size=64, hidden=16, layers=2, heads=2, kv_heads=1,
                                  head_dim=8, mlp_dim=32, max_positions=64),
    ("vision", "clip"): VisionConfig(image_size=28, patch_size=14, width=16, layers=2, heads=2,
                                     mlp_dim=32, proj_dim=16),
}


# --- a toy decoder family: config, module and HF mapping, registered as one row ---------------

@dataclasses.dataclass(frozen=True)
class ToyConfig:
  vocab_size: int = 32
  hidden: int = 8
  layers: int = 1
  tie_embeddings: bool = False
  family: str = "toy"


class Toy(Part):
  """Embedding -> tanh(Dense) -> head: the decoder interface VLM uses (embed, __call__, logits)."""

  def setup(self):
    c = self.cfg
    self.embedding = self.param(
        "embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (c.vocab_size, c.hidden), jnp.float32)
    self.mix = Dense(c.hidden, ("embed", "mlp"), dtype=self.dtype, name="mix")
    self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), dtype=self.dtype, name="lm_head")

  def embed(self, ids):
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def __call__(self, h, positions, segment_ids=None, cache=None, deterministic=True,
               return_hidden=False):
    h = jnp.tanh(self.mix(h, deterministic))
    return h if return_hidden else self.logits(h)

  def logits(self, h):
    return self.lm_head(h).astype(jnp.float32)


TOY = families.Family(
    name="toy", part="llm", config=ToyConfig, module=f"{__name__}:Toy",
    hf=families.HF(
        model_types={"toy": "ToyForCausalLM"},
        rules=lambda c, targets: [families.WeightRule(("embed",), "embed_tokens.weight"),
                                  *families.linear(("mix",), "layers.0.mix"),
                                  *families.linear(("lm_head",), "lm_head")],
        read=lambda d: ToyConfig(vocab_size=d["vocab_size"], hidden=d["hidden_size"]),
        write=lambda c: {"model_type": "toy", "vocab_size": c.vocab_size,
                         "hidden_size": c.hidden},
        projections={}, template=lambda text, tokens, vlm, source: "vicuna_v1"))


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(families.LLM, "toy", TOY)
  return VLMConfig(llm=ToyConfig())


def _same(a, b):
  fa, fb = flatten_dict(a), flatten_dict(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_a_toy_family_is_one_row(toy, tmp_path):
  params = init_params(toy, jax.random.key(0))
  assert sorted("/".join(k) for k in flatten_dict(params["llm"])) == [
      "embed", "lm_head/kernel", "mix/kernel"]
  ids = jnp.array([[1, 2, 3]], jnp.int32)
  logits = VLM(toy).apply({"params": params}, ids)
  assert logits.shape == (1, 3, 32) and logits.dtype == jnp.float32
  # config.json names the family and reads back into its dataclass
  back = VLMConfig.from_dict(toy.to_dict())
  assert back == toy and isinstance(back.llm, ToyConfig)
  # HF: the generic converter applies the row's mapping both ways
  exported = dict(hf.iter_export(toy, params, hf.hf_name(toy)))
  assert sorted(exported) == ["lm_head.weight", "model.embed_tokens.weight",
                              "model.layers.0.mix.weight"]
  _same(vlm_hf.import_weights(toy, {vlm_hf.canonical_name(k): v for k, v in exported.items()}),
        params)
  conf = hf.hf_config(toy)
  assert conf["architectures"] == ["ToyForCausalLM"]
  assert vlm_hf.vlm_config(conf) == toy


@pytest.mark.parametrize("part,name", sorted(TINY))
def test_every_family_maps_its_whole_tree_and_round_trips_its_hf_config(part, name):
  fam = families.get(part, name)
  cfg = TINY[(part, name)]
  assert isinstance(cfg, fam.config) and cfg.family == name
  assert fam.hf.read(fam.hf.write(cfg)) == cfg
  llm = cfg if part == "llm" else TINY[("llm", "llama")]
  vision = cfg if part == "vision" else TINY[("vision", "clip")]
  lora = LoraConfig(rank=2, targets=tuple(families.of("llm", llm).hf.projections),
                    vision_targets=tuple(families.of("vision", vision).hf.projections))
  for vcfg in (VLMConfig(llm=llm, vision=vision, tiler=TilerConfig(kind="anyres"),
                         image_token_id=3, lora=lora),
               VLMConfig(llm=llm, vision=vision, image_token_id=3)):
    shapes = flatten_dict(abstract_params(vcfg, boxed=False))
    assert sorted(r.path for r in vlm_hf.rules(vcfg)) == sorted(shapes)
  params = init_params(vcfg, jax.random.key(1))
  exported = dict(hf.iter_export(vcfg, params, hf.hf_name(vcfg)))
  _same(vlm_hf.import_weights(vcfg, {vlm_hf.canonical_name(k): v for k, v in exported.items()}),
        params)


def test_every_registered_family_has_a_tiny_config():
  registered = {(p, n) for p, table in (("llm", families.LLM), ("vision", families.VISION))
                for n in table}
  assert registered == set(TINY)


def test_unknown_family_fails_in_one_line():
  d = VLMConfig().to_dict()
  d["llm"]["family"] = "gpt9"
  with pytest.raises(ValueError, match=r"unknown llm family 'gpt9'; known: \['llama'\]") as e:
    VLMConfig.from_dict(d)
  assert "\n" not in str(e.value)
  bad = VLMConfig(llm=dataclasses.replace(TINY[("llm", "llama")], family="gpt9"))
  with pytest.raises(ValueError, match="unknown llm family 'gpt9'"):
    init_params(bad, jax.random.key(0))
  with pytest.raises(ValueError, match="unknown vision family 'siglip9'"):
    families.get("vision", "siglip9")


def test_old_config_json_loads_as_llama_and_clip():
  cfg = VLMConfig(llm=TINY[("llm", "llama")], vision=TINY[("vision", "clip")], image_token_id=3)
  d = cfg.to_dict()
  del d["llm"]["family"], d["vision"]["family"]
  d.update(dtype="bfloat16", remat="full", vision_remat="none", attention="xla", scan_layers=True)
  assert VLMConfig.from_dict(d) == cfg   # runtime keys of older checkpoints are dropped
