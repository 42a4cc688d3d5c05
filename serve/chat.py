"""Chat with a model about an image from the command line; the answer streams as it is generated.

  python -m serve.chat --ckpt CKPT --image scan.dcm "Is there a fracture?"
  python -m serve.chat --ckpt CKPT --image slide.png          # interactive: a conversation

CKPT is a checkpoint dir of this project, a HF model dir or a train.main workdir (its final/).
Images may be PNG, JPEG (any PIL format) or DICOM. The interactive loop keeps the conversation,
as LLaVA's cli does: each answer sees the earlier turns, and the image goes with the first
question. `/reset` starts a new conversation about the same image, `/image PATH` a new one about
another image, `/quit` or end of input leaves. A follow-up question runs on the serving engine's
slot that still holds the conversation: the image is not encoded and the earlier turns are not
prefilled again.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from data.errors import BadSample, UserError, cli_errors

PROMPT = ">>> "


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m serve.chat", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("question", nargs="?", help="one question; omit it for an interactive loop")
  p.add_argument("--ckpt", required=True,
                 help="checkpoint dir of this project, a HF model dir or a train.main workdir")
  p.add_argument("--image", help="PNG / JPEG / DICOM file (omit for a text-only question)")
  p.add_argument("--frame", type=int, default=0, help="frame of a multi-frame DICOM / TIFF / GIF")
  from serve.generate import add_sampling_args
  add_sampling_args(p, max_new_tokens=512)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default float32); a HF dir's weights are cast to it")
  return p


class Chat:
  """A loaded model, the current image and the conversation so far; `ask` streams one answer
  to `out` and adds the turn to the history."""

  def __init__(self, args, image=None):
    from serve.generate import Generator, sampling_params
    self.params = sampling_params(args)
    self.gen = Generator.from_checkpoint(args.ckpt, dtype=args.dtype)
    self.engine = self.gen.engine(self.gen.context_layout(1))
    self.system, self.frame, self.image, self.history = args.system, args.frame, None, []
    if image is not None or args.image:
      self.set_image(args.image, image)

  def set_image(self, path: str, decoded=None):
    """Switches to the image at `path` (`decoded`: already read) and starts a new conversation."""
    from data.image import load_image
    if self.gen.config.vision is None:
      raise BadSample("no_vision", "this model is text-only; it cannot take an image", path=path)
    self.image = load_image(path, frame=self.frame) if decoded is None else decoded
    self.reset()

  def reset(self):
    self.history = []

  def ask(self, question: str, out=None) -> str:
    from serve.prompt import build_prompt
    out = out or sys.stdout
    prompt = build_prompt(self.gen.config, self.gen.tokenizer, question,
                          [] if self.image is None else [self.image], system=self.system,
                          history=self.history)

    from serve.engine import Request

    def emit(event):
      if event.text:
        out.write(event.text)
        out.flush()

    req = Request(prompt, self.params, emit)
    self.engine.check(req)
    self.engine.run([req])
    if req.error:
      raise RuntimeError(req.error)
    out.write("\n")
    out.flush()
    self.history.append((question, req.result.text))
    return req.result.text


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
      if line == "/reset":
        chat.reset()
        out.write("(new conversation)\n")
      elif line.startswith("/image "):
        chat.set_image(line[len("/image "):].strip())
        out.write("(image loaded; new conversation)\n")
      else:
        chat.ask(line, out)
    except (BadSample, UserError) as e:  # a bad image, question or length ends that turn
      out.write(f"error: {e}\n")


def check_inputs(args):
  """Everything that can be checked before the model loads (seconds to minutes for a large one):
  the question, the checkpoint path, the image. Returns the decoded image or None."""
  from data.image import load_image
  from serve import workdir
  if args.question is not None and not args.question.strip():
    raise UserError("the question is empty")
  from serve.generate import sampling_params
  sampling_params(args)   # every sampling flag in its range
  args.ckpt = workdir.resolve(args.ckpt)
  return load_image(args.image, frame=args.frame) if args.image else None


def main(argv: Optional[list] = None) -> None:
  args = _parser().parse_args(argv)
  with cli_errors():
    image = check_inputs(args)
    from vlm import compile_cache
    compile_cache.enable()   # a rerun skips the prefill / decode compiles (vlm/compile_cache.py)
    chat = Chat(args, image)
    if args.question is not None:
      chat.ask(args.question)
    else:
      interactive(chat)


if __name__ == "__main__":
  main()
