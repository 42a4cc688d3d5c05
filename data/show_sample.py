"""Show how one sample is tokenized for training: which tokens are trained and how many.

  python -m data.show_sample --tokenizer DIR --template llama3 --sample FILE [--image-tokens 729]
  python -m data.show_sample ... --id pmc-123        # the sample with this id (or --index N)
  python -m data.show_sample ... --json   # exactly {"input_ids": [...], "labels": [...]}

FILE is a LLaVA / LLaVA-Med JSON list (or one object, or JSON lines); the first sample is shown
unless --id or --index picks another. Trained spans are highlighted; each image's placeholder run
is shown as one <image>xN marker. The placeholder id is the tokenizer's `<image>` token. Lines
are never wrapped by the tool (a terminal or pager wraps them), so piped output keeps the text.
To check a whole data set as training reads it, use `python -m train.validate`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import numpy as np

from data import conversation
from data.errors import UserError, cli_errors
from data.jsonfile import read_records


def pick(path: str, sample_id: Optional[str] = None, index: Optional[int] = None) -> dict:
  """The sample of a JSON list / object / JSON-lines file with this id (compared as text), or at
  this index (negative counts from the end); default the first."""
  rows = read_records(path)
  if not rows:
    raise UserError(f"no samples in {path}")
  if sample_id is not None:
    found = [r for r in rows if str(r.get("id")) == sample_id]
    if not found:
      raise UserError(f"no sample with id {sample_id!r} in {path} ({len(rows)} samples)")
    return found[0]
  index = 0 if index is None else index
  if not -len(rows) <= index < len(rows):
    raise UserError(f"--index {index} is out of range: {path} holds {len(rows)} samples")
  return rows[index]


def image_token_id(tokenizer) -> int:
  vocab = tokenizer.get_vocab()
  if conversation.IMAGE not in vocab:
    raise UserError(f"tokenizer has no {conversation.IMAGE} token; add it as a special token")
  return vocab[conversation.IMAGE]


def spans(ids: np.ndarray, labels: np.ndarray, image_id: int) -> list:
  """[(kind, start, end)] runs of kind 'image' | 'trained' | 'masked'."""
  kinds = np.where(ids == image_id, 0, np.where(labels != conversation.IGNORE, 1, 2))
  cuts = np.flatnonzero(np.diff(kinds)) + 1
  starts, ends = np.r_[0, cuts], np.r_[cuts, len(ids)]
  names = ("image", "trained", "masked")
  return [(names[kinds[s]], int(s), int(e)) for s, e in zip(starts, ends)]


def render(tokenizer, ids, labels, image_id, console) -> None:
  from rich.text import Text
  out = Text()
  for kind, s, e in spans(ids, labels, image_id):
    if kind == "image":
      out.append(f"<image>x{e - s}", style="bold magenta")
    else:
      out.append(tokenizer.decode(ids[s:e].tolist(), skip_special_tokens=False),
                 style="black on green" if kind == "trained" else "dim")
  console.print(out, soft_wrap=True)   # piped output keeps whole lines (no hard wraps)
  n_img = int((ids == image_id).sum())
  n_train = int((labels != conversation.IGNORE).sum())
  console.print(f"\ntokens: {len(ids)}  trained: {n_train}  "
                f"masked text: {len(ids) - n_train - n_img}  image placeholders: {n_img}",
                style="bold")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m data.show_sample", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokenizer", required=True, help="HF tokenizer dir (local)")
  ap.add_argument("--template", required=True, choices=conversation.TEMPLATES)
  ap.add_argument("--sample", required=True,
                  help="JSON / JSONL file; the first sample is used unless --id / --index")
  which = ap.add_mutually_exclusive_group()
  which.add_argument("--id", help="show the sample with this id")
  which.add_argument("--index", type=int, help="show the sample at this index (0 = first)")
  ap.add_argument("--image-tokens", type=int, default=729,
                  help="placeholders per image (729 S2-378, 576 LLaVA-1.5); default 729")
  ap.add_argument("--system", default=None, help="system prompt ('' for none; default: template's)")
  ap.add_argument("--image-position", choices=conversation.IMAGE_POSITIONS, default=None,
                  help="keep <image> where the sample has it, or first in its turn (LLaVA); "
                  "default: the template's")
  ap.add_argument("--max-len", type=int, default=None, help="truncate as training does")
  ap.add_argument("--json", action="store_true",
                  help='print {"input_ids": [...], "labels": [...]}')
  args = ap.parse_args(argv)

  with cli_errors():
    return show(args)


def show(args) -> int:
  from data.tokenizer import load_tokenizer
  sample = pick(args.sample, args.id, args.index)
  tokenizer = load_tokenizer(args.tokenizer)
  image_id = image_token_id(tokenizer)
  out = conversation.encode(sample, tokenizer, args.template, image_tokens=args.image_tokens,
                            image_token_id=image_id, system=args.system,
                            image_position=args.image_position, max_len=args.max_len)
  if args.json:
    print(json.dumps({"input_ids": out["input_ids"].tolist(), "labels": out["labels"].tolist()}))
    return 0
  from rich.console import Console
  render(tokenizer, out["input_ids"], out["labels"], image_id, Console())
  return 0


if __name__ == "__main__":
  sys.exit(main())
