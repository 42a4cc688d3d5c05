"""Chat with a model about an image from the command line; the answer streams as it is generated.

  python -m serve.chat --ckpt CKPT --image scan.dcm "Is there a fracture?"
  python -m serve.chat --ckpt CKPT --image slide.png          # interactive: one question per line

Images may be PNG, JPEG (any PIL format) or DICOM. In the interactive loop each question is
answered on its own about the current image (no history); `/image PATH` switches the image,
`/quit` or end of input leaves.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from data.errors import BadSample

PROMPT = ">>> "


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m serve.chat", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("question", nargs="?", help="one question; omit it for an interactive loop")
  p.add_argument("--ckpt", required=True, help="checkpoint dir of this project or a HF model dir")
  p.add_argument("--image", help="PNG / JPEG / DICOM file (omit for a text-only question)")
  p.add_argument("--frame", type=int, default=0, help="frame of a multi-frame DICOM / TIFF / GIF")
  from serve.generate import add_sampling_args
  add_sampling_args(p, max_new_tokens=512)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default: the checkpoint's)")
  return p


class Chat:
  """A loaded model + the current image; `ask` streams one answer to `out`."""

  def __init__(self, args):
    from serve.generate import Generator, sampling_config
    overrides = {"dtype": args.dtype} if args.dtype else {}
    self.gen = Generator.from_checkpoint(args.ckpt, **overrides)
    self.gc = sampling_config(args)
    self.system, self.frame, self.image = args.system, args.frame, None
    if args.image:
      self.set_image(args.image)

  def set_image(self, path: str):
    from data.image import load_image
    if self.gen.config.vision is None:
      raise BadSample("no_vision", "this model is text-only; it cannot take an image", path=path)
    self.image = load_image(path, frame=self.frame)

  def ask(self, question: str, out=None) -> str:
    from serve.prompt import build_prompt
    out = out or sys.stdout
    prompt = build_prompt(self.gen.config, self.gen.tokenizer, question,
                          [] if self.image is None else [self.image], system=self.system)
    started = []

    def emit(_row, delta):
      if not started:  # the template leaves a space or newline before the answer
        delta = delta.lstrip()
        if not delta:
          return
        started.append(True)
      out.write(delta)
      out.flush()

    [res] = self.gen.generate([prompt], self.gc, stream=emit, batch_size=1)
    out.write("\n")
    out.flush()
    return res.text


def interactive(chat: Chat, inp=None, out=None):
  inp, out = inp or sys.stdin, out or sys.stdout
  while True:
    out.write(PROMPT)
    out.flush()
    line = inp.readline()
    if not line or line.strip() == "/quit":
      return
    line = line.strip()
    if not line:
      continue
    try:
      if line.startswith("/image "):
        chat.set_image(line[len("/image "):].strip())
        out.write("(image loaded)\n")
      else:
        chat.ask(line, out)
    except BadSample as e:  # a bad image or question ends that turn, not the session
      out.write(f"error: {e}\n")


def main(argv: Optional[list] = None) -> None:
  args = _parser().parse_args(argv)
  from vlm import compile_cache
  compile_cache.enable()   # a rerun skips the prefill / decode compiles (vlm/compile_cache.py)
  try:
    chat = Chat(args)
    if args.question is not None:
      chat.ask(args.question)
    else:
      interactive(chat)
  except (BadSample, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
