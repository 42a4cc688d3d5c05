"""Shared conversation test data: the questions and answers, the tiny tokenizers (module-scoped
fixtures, imported by each test_conversation* file) and the samples built from them."""
import pytest

from tiny_tokenizers import llama2_tokenizer, llama3_tokenizer, load, mistral_tokenizer

IMG_TOKENS = 5
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
Q1, A1 = "What modality is this?", "This is a chest X-ray.\nThe heart is enlarged."
Q2, A2 = "Is there a fracture?", "No, there is no fracture."


@pytest.fixture(scope="module")
def tok3(tmp_path_factory):
  return load(llama3_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok2(tmp_path_factory):
  return load(llama2_tokenizer(tmp_path_factory.mktemp("tok")))

@pytest.fixture(scope="module")
def mistral_legacy(tmp_path_factory):
  """Mistral's real SentencePiece tokenizer as Mistral-7B-Instruct-v0.2 ships it (legacy)."""
  return load(mistral_tokenizer(tmp_path_factory.mktemp("tok"), legacy=True))


@pytest.fixture(scope="module")
def mistral_nonlegacy(tmp_path_factory):
  return load(mistral_tokenizer(tmp_path_factory.mktemp("tok"), legacy=False))

def sample(image_first=True, sid="s1", key="conversations"):
  q1 = f"<image>\n{Q1}" if image_first else f"{Q1}\n<image>"
  return {"id": sid, "image": "x.png", key: [
      {"from": "human", "value": q1}, {"from": "gpt", "value": A1},
      {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]}

def conv(*values, image=True):
  s = {"id": "r1", "conversations": [{"from": ("human", "gpt")[i % 2], "value": v}
                                     for i, v in enumerate(values)]}
  if image:
    s["image"] = "x.png"
  return s
