"""The prompt format an import picks (docs/conversion.md): the text config's model_type and the
tokenizer's special tokens say which reference code trained a checkpoint. Configs are tiny HF ones
(tests/hf_models.py), written with their tokenizer files and no weights: dir_config reads only
those, so each case takes milliseconds."""
import json
import os
import shutil

import pytest
import transformers as T

from vlm import hf
from data.conversation import LLAVA_NEXT_LLAMA3_SYSTEM
from tests import hf_models as H
from tests import tiny_tokenizers
from tests.test_convert_util import PINPOINTS, cli

LLAVA_NEXT = "first_next"   # LLaVA-NeXT's train.py preprocess_multimodal


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
  """Tokenizer dirs: Llama-2 / Vicuna SentencePiece, Llama-3, Mistral's own, and two ChatML ones
  (Nous-Hermes-2-Yi, the LLM of LLaVA-1.6-34B): markers as added tokens, or only in the vocab."""
  base = tmp_path_factory.mktemp("toks")
  out = {"llama2": tiny_tokenizers.llama2_tokenizer(base / "l2"),
         "llama3": tiny_tokenizers.llama3_tokenizer(base / "l3"),
         "mistral": tiny_tokenizers.mistral_tokenizer(base / "m")}
  tok = tiny_tokenizers.load(out["llama2"])
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  out["chatml"] = str(base / "chatml")
  tok.save_pretrained(out["chatml"])
  with open(os.path.join(out["llama2"], "tokenizer.json")) as f:
    spec = json.load(f)
  vocab = spec["model"]["vocab"]
  vocab.update({"<|im_start|>": len(vocab), "<|im_end|>": len(vocab) + 1})
  os.makedirs(base / "chatml_vocab")
  with open(base / "chatml_vocab" / "tokenizer.json", "w") as f:
    json.dump(spec, f)
  out["chatml_vocab"] = str(base / "chatml_vocab")
  return out


def hf_dir(path, config, tok=None) -> str:
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  if tok:
    for name in os.listdir(tok):
      shutil.copy(os.path.join(tok, name), path)
  return str(path)


def llava(kind, *, mistral=False, vocab=32064, **text):
  """A llava-hf config: LlavaConfig (1.5) or LlavaNextConfig (1.6), Llama or Mistral text."""
  text = H.llama_config(vocab=vocab, mistral=mistral, **text)
  if kind == "llava":
    return T.LlavaConfig(vision_config=H.clip_config(), text_config=text, image_token_index=32000)
  return T.LlavaNextConfig(vision_config=H.clip_config(), text_config=text,
                           image_token_index=32000, image_grid_pinpoints=PINPOINTS)


CASES = {   # name: (config, tokenizer, (template, image_position, system))
    "llava-1.5-7b-hf": (lambda: llava("llava"), "llama2", ("vicuna_v1", None, None)),
    "llava-v1.6-vicuna-7b-hf": (lambda: llava("llava_next"), "llama2",
                                ("vicuna_v1", LLAVA_NEXT, None)),
    # LLaVA-NeXT conv_mistral_instruct: "[INST] <image>\nWhat is shown in this image? [/INST]"
    "llava-v1.6-mistral-7b-hf": (lambda: llava("llava_next", mistral=True), "mistral",
                                 ("llava_mistral", LLAVA_NEXT, None)),
    "llava-v1.6-mistral, no tokenizer files": (lambda: llava("llava_next", mistral=True), None,
                                               ("llava_mistral", LLAVA_NEXT, None)),
    "llava-med-v1.5-mistral-7b as llava-hf": (lambda: llava("llava", mistral=True), "mistral",
                                              ("llava_mistral", None, None)),
    # small vocabularies: the tokenizer decides, not the size
    "llama3-llava-next-8b-hf": (lambda: llava("llava_next", vocab=700), "llama3",
                                ("llama3", LLAVA_NEXT, LLAVA_NEXT_LLAMA3_SYSTEM)),
    "llava + Llama-3": (lambda: llava("llava", vocab=700), "llama3", ("llama3", None, None)),
    "Llama-3-8B-Instruct": (lambda: H.llama_config(vocab=700), "llama3", ("llama3", None, None)),
    "Llama-3, no tokenizer files": (lambda: H.llama_config(vocab=128256, bos_token_id=128000),
                                    None, ("llama3", None, None)),
    "vicuna-7b-v1.5": (lambda: H.llama_config(vocab=32000), "llama2", ("vicuna_v1", None, None)),
    # a Mistral with a >= 128k vocabulary (Mistral-Nemo) is still Mistral
    "Mistral-7B-Instruct": (lambda: H.llama_config(vocab=131072, mistral=True), "mistral",
                            ("mistral_instruct", None, None)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_import_picks_the_training_format(toks, tmp_path, name):
  config, tok, want = CASES[name]
  cfg = hf.dir_config(hf_dir(tmp_path / "m", config(), toks[tok] if tok else None))
  assert (cfg.template, cfg.image_position, cfg.system) == want


@pytest.mark.parametrize("tok", ["chatml", "chatml_vocab"])
def test_llava_16_34b_is_refused_naming_chatml_direct(toks, tmp_path, capsys, tok):
  """LLaVA-1.6-34B (Yi, model_type 'llama') was trained in chatml_direct: no silent vicuna_v1."""
  src = hf_dir(tmp_path / "m", llava("llava_next", vocab=64064), toks[tok])
  with pytest.raises(SystemExit) as e:
    cli("import", "--from", "hf", src, "--out", tmp_path / "ck")
  assert e.value.code == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
  assert len(err) == 1 and "chatml_direct" in err[0] and "not support" in err[0], err


def test_unsupported_text_model_is_refused(tmp_path):
  d = llava("llava_next").to_dict()
  d["text_config"]["model_type"] = "qwen2"
  os.makedirs(tmp_path / "m")
  with open(tmp_path / "m" / "config.json", "w") as f:
    json.dump(d, f)
  with pytest.raises(hf.ConversionError, match="text model_type='qwen2'"):
    hf.dir_config(str(tmp_path / "m"))


@pytest.mark.parametrize("tok,anyres,want", [
    ("llama3", False, ("llama3", None, None)), ("llama2", False, ("vicuna_v1", None, None)),
    ("llama2", True, ("vicuna_v1", LLAVA_NEXT, None)),
    ("llama3", True, ("llama3", LLAVA_NEXT, LLAVA_NEXT_LLAMA3_SYSTEM)), ("chatml", True, None)])
def test_llava_code_base_reads_the_tokenizer_too(toks, tok, anyres, want):
  """`--from llava`: LlavaLlamaForCausalLM holds Vicuna, Llama-3 or Yi (liuhaotian/llava-v1.6-34b);
  an anyres one was trained by LLaVA-NeXT's code."""
  from convert import llava as L
  from vlm.config import VisionConfig
  d = H.llama_config(vocab=700).to_dict()
  d.update(model_type="llava_llama", mm_vision_tower="tower", mm_hidden_size=16,
           mm_projector_type="mlp2x_gelu")
  if anyres:
    d.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
             image_grid_pinpoints=PINPOINTS)
  vision = VisionConfig(image_size=28, patch_size=14, width=16, layers=3, heads=2, mlp_dim=32)
  tokens = hf.tokenizer_tokens(toks[tok])
  if want is None:
    with pytest.raises(hf.ConversionError, match="chatml_direct"):
      L.to_vlm(d, vision, tokens=tokens)
  else:
    cfg = L.to_vlm(d, vision, tokens=tokens)
    assert (cfg.template, cfg.image_position, cfg.system) == want


def test_training_from_a_hf_dir_reads_it_like_the_import(toks, tmp_path):
  """model.init = a llava-hf dir: train/source.py takes the format the import would."""
  import ml_collections
  from train.source import source_config
  src = hf_dir(tmp_path / "m", llava("llava_next", mistral=True), toks["mistral"])
  c = ml_collections.ConfigDict({"model": {"init": src, "preset": None}})
  cfg = source_config(c)
  assert (cfg.template, cfg.image_position) == ("llava_mistral", LLAVA_NEXT)
