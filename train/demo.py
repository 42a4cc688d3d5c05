"""Synthetic data and a tiny tokenizer for configs/demo.py: both training stages on CPU in minutes.

Images are coloured shapes on a dark background; stage 1 captions them (`plain` template), stage 2
asks about shape, colour and position (`llama3` template), so answers depend on the image and
both losses can fall well below chance. The tokenizer is a byte-level BPE with Llama-3's special
tokens and `<image>`, trained on this text. Everything is written under DIR/data by `prepare`.

  python -m train.demo [--workdir DIR]     # = python -m train.main --config configs/demo.py
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230),
           "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "cross")
PLACES = ("left", "right")
SIDE = 56
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
         r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")   # Llama-3's pre-tokenizer


def draw(shape: str, colour: str, place: str, rng: np.random.Generator) -> np.ndarray:
  img = np.full((SIDE, SIDE, 3), rng.integers(0, 40, 3), np.uint8)
  img += rng.integers(0, 12, img.shape, dtype=np.uint8)
  r = int(rng.integers(10, 14))
  cy = int(rng.integers(r, SIDE - r))
  cx = SIDE // 4 + int(rng.integers(-3, 4)) + (SIDE // 2 if place == "right" else 0)
  yy, xx = np.mgrid[:SIDE, :SIDE]
  if shape == "circle":
    m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
  elif shape == "square":
    m = (abs(yy - cy) <= r * 0.8) & (abs(xx - cx) <= r * 0.8)
  else:
    m = ((abs(yy - cy) <= r) & (abs(xx - cx) <= r // 3)) | ((abs(xx - cx) <= r) &
                                                             (abs(yy - cy) <= r // 3))
  img[m] = COLOURS[colour]
  return img


def records(n: int, seed: int, root: str, prefix: str) -> tuple:
  """(stage-1 caption records, stage-2 conversation records) over n drawn images."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  combos = list(itertools.product(SHAPES, COLOURS, PLACES))
  caps, convs = [], []
  for i in range(n):
    shape, colour, place = combos[int(rng.integers(len(combos)))]
    name = f"images/{prefix}{i:04d}.png"
    Image.fromarray(draw(shape, colour, place, rng)).save(os.path.join(root, name))
    caps.append({"id": f"{prefix}cap{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": f"A {colour} {shape} on the {place} of a dark image."}]})
    qa = [("What shape is shown?", f"A {shape}."),
          ("What colour is the shape?", f"It is {colour}."),
          ("Where is the shape?", f"On the {place} side.")]
    order = rng.permutation(len(qa))[:int(rng.integers(1, 4))]
    turns = []
    for j, k in enumerate(order):
      q, a = qa[k]
      turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q},
                {"from": "gpt", "value": a}]
    convs.append({"id": f"{prefix}qa{i}", "image": name, "conversations": turns})
  return caps, convs


def tokenizer(path: str, texts: list) -> str:
  """Byte-level BPE with Llama-3's split, special tokens and BOS post-processor, plus <image>."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=LLAMA3_SPECIAL, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  bos = LLAMA3_SPECIAL[0]
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                    special_tokens=[(bos, tok.token_to_id(bos))])])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=LLAMA3_SPECIAL[1])
  fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
  fast.save_pretrained(path)
  return path


def prepare(workdir: str, *, train: int = 384, held_out: int = 48) -> str:
  """Write DIR/data/{tokenizer, images, stage1*.json, stage2*.json} once; returns DIR/data."""
  root = os.path.join(workdir, "data")
  done = os.path.join(root, "DONE")
  if os.path.exists(done):
    return root
  os.makedirs(root, exist_ok=True)
  caps, convs = records(train, 0, root, "t")
  caps_eval, convs_eval = records(held_out, 1, root, "e")
  for name, recs in (("stage1_train", caps), ("stage1_eval", caps_eval),
                     ("stage2_train", convs), ("stage2_eval", convs_eval)):
    with open(os.path.join(root, f"{name}.json"), "w") as f:
      json.dump(recs, f)
  texts = [t["value"].replace("<image>", "") for r in caps + convs for t in r["conversations"]]
  texts += ["user", "assistant", "system"]
  tokenizer(os.path.join(root, "tokenizer"), texts)
  open(done, "w").close()
  return root


def main(argv=None):
  ap = argparse.ArgumentParser(description="Train the tiny demo model (stage 1, then stage 2) on "
                               "synthetic shapes, on CPU, in a few minutes.")
  ap.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and logs go")
  args, rest = ap.parse_known_args(argv)
  from train import main as train_main
  train_main.entry(["train.main", "--config", "demo.py", "--workdir", args.workdir, *rest])


if __name__ == "__main__":
  main(sys.argv[1:])
