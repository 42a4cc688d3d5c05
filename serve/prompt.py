"""Generation prompts: a question (+ images) -> token ids and model-ready pixels.

The host side of inference, shared by `serve.chat`, `evaluation.vqa run` and the benchmarks so that
placeholder counts, image geometry and templates agree with training (data/pipeline.py): square
tilers ship uint8 [S, S, 3] at the tiler's input size (normalized inside the model); anyres ships
the base image + tiles padded to the tiler's maximum, with the original (height, width).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from data.conversation import render_prompt
from data.image import ImageGeometry, model_pixels
from vlm.config import VLMConfig


@dataclasses.dataclass
class Prompt:
  """One row of a generation batch. pixels: uint8 [n_images, S, S, 3] (square tilers) or
  [n_images, tiles, t, t, 3] (anyres) or None; image_sizes: int32 [n_images, 4] (anyres only:
  height, width, tile rows, tile cols); image_tokens: each image's placeholder count (None: the
  placeholders split evenly, as square tilers make them)."""
  ids: np.ndarray
  pixels: Optional[np.ndarray] = None
  image_sizes: Optional[np.ndarray] = None
  image_tokens: Optional[tuple] = None


def image_inputs(config: VLMConfig, img: np.ndarray) -> tuple:
  """uint8 [H, W, 3] -> (pixels for one image, (height, width, rows, cols) or None, placeholder
  count)."""
  g = ImageGeometry.of(config)   # what the training pipeline ships and counts, too
  pixels, hw = model_pixels(img, g)
  return pixels, hw, g.tokens(img.shape[:2])


def build_prompt(config: VLMConfig, tokenizer, question: str, images: Sequence[np.ndarray] = (),
                 *, system: Optional[str] = None, history: Sequence[tuple] = ()) -> Prompt:
  """Render `question` as the model was trained, after the earlier (question, answer) turns of
  `history`: its template, image position and system prompt (`system` None: the model's). The
  images, in order, go to the `<image>` markers of the questions, as the image position rule
  places them, or, without markers, in front of the first question (as LLaVA's eval and cli do)."""
  prepared = [image_inputs(config, im) for im in images]
  counts = [c for _, _, c in prepared]
  ids = render_prompt(question, tokenizer, config.template, image_tokens=counts or 0,
                      image_token_id=config.image_token_id,
                      system=config.system if system is None else system,
                      image_position=config.image_position, history=history)
  if not prepared:
    return Prompt(ids)
  pixels = np.stack([p for p, _, _ in prepared])
  sizes = (np.asarray([hw for _, hw, _ in prepared], np.int32)
           if config.tiler.kind == "anyres" else None)
  return Prompt(ids, pixels, sizes, tuple(counts))
