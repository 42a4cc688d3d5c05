"""OpenAI chat-completions requests -> generation prompts.

Messages (text and `image_url` parts) become a conversation in the model's template: system
messages the system prompt, earlier user/assistant turns the history, the last user message the
question; each image part is an `<image>` marker where the part stands. Images come from data:
URIs (base64; PNG, JPEG, DICOM...) or, when the server has an image root, from local paths inside
it. Every problem is an ApiError (a 4xx with a one-line message), raised before the request
reaches the model, so a bad request costs nothing and the server keeps serving.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from typing import Any, Optional

from data.conversation import IMAGE
from data.errors import BadSample

MAX_STOP_STRINGS = 4  # OpenAI's limit


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for (each breach is a 4xx naming the limit)."""
  max_request_bytes: int = 32 * 2**20
  max_image_pixels: int = 4096 * 4096
  max_images: int = 8
  max_tokens: int = 2048
  image_root: Optional[str] = None


class ApiError(Exception):
  """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: Optional[str] = None, code: Optional[str] = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
  system: Optional[str]
  history: list          # [(question, answer)] with <image> markers in the questions
  question: str
  images: list           # data: URIs or paths, in marker order
  sampling: object       # serve.sampling.SamplingParams (max_tokens: the field below)
  max_tokens: int
  stream: bool
  include_usage: bool
  default_max_tokens: bool = False   # max_tokens not given: to_prompt fits it to the context


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
  return ApiError(400, message, param=param, code=code)


def _number(body: dict, name: str, kind, lo, hi, default, *, lo_open: bool = False):
  x = body.get(name)
  if x is None:
    return default
  if isinstance(x, bool) or not isinstance(x, (int, float)) or (kind is int and x != int(x)):
    raise _bad(f"{name} must be {'an integer' if kind is int else 'a number'}, got {x!r:.40}", name)
  if x < lo or (lo_open and x == lo) or (hi is not None and x > hi):
    raise _bad(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}"
               f"], got {x}", name)
  return kind(x)


def _flag(body: dict, name: str) -> bool:
  x = body.get(name, False)
  if not isinstance(x, bool):
    raise _bad(f"{name} must be true or false, got {x!r:.40}", name)
  return x


def _text(content: Any, where: str, *, images: Optional[list]) -> str:
  """A message's content (a string or a list of parts) as text; image parts become <image>
  markers (their URLs appended to `images`), or an error where images are not allowed."""
  if content is None:
    return ""
  if isinstance(content, str):
    parts = [{"type": "text", "text": content}]
  elif isinstance(content, list):
    parts = content
  else:
    raise _bad(f"{where}.content must be a string or a list of parts", f"{where}.content")
  out = []
  for j, part in enumerate(parts):
    here = f"{where}.content[{j}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
      text = part.get("text")
      if not isinstance(text, str):
        raise _bad(f"{here}.text must be a string", here)
      if IMAGE in text:
        raise _bad(f"{here}: the text contains the image marker {IMAGE}; send images as "
                   "image_url parts", here)
      out.append(text)
    elif kind == "image_url":
      if images is None:
        raise _bad(f"{here}: only user messages can hold images", here)
      ref = part.get("image_url")
      url = ref.get("url") if isinstance(ref, dict) else ref
      if not isinstance(url, str) or not url:
        raise _bad(f"{here}.image_url.url must be a non-empty string", here)
      images.append(url)
      out.append(IMAGE)
    else:
      raise _bad(f"{here}: unsupported part type {kind!r} (text and image_url are)", here)
  return "\n".join(out)


def parse(body: Any, defaults, limits: Limits) -> ChatRequest:
  """A decoded JSON body -> ChatRequest; `defaults` is the server's SamplingParams."""
  if not isinstance(body, dict):
    raise _bad("the request body must be a JSON object")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise _bad("messages must be a non-empty list", "messages")
  if body.get("n", 1) != 1:
    raise _bad("only n=1 is supported", "n")
  system, turns, images = [], [], []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    role = m.get("role") if isinstance(m, dict) else None
    if role in ("system", "developer"):
      system.append(_text(m.get("content"), where, images=None))
      continue
    if role not in ("user", "assistant"):
      raise _bad(f"{where}.role must be system, user or assistant, got {role!r:.30}",
                 f"{where}.role")
    text = _text(m.get("content"), where, images=images if role == "user" else None)
    if turns and turns[-1][0] == role:   # consecutive messages of one role read as one
      turns[-1] = (role, turns[-1][1] + "\n" + text)
    else:
      turns.append((role, text))
  if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
    raise _bad("the conversation must start and end with a user message", "messages")
  if not turns[-1][1].replace(IMAGE, "").strip() and IMAGE not in turns[-1][1]:
    raise _bad("the last user message is empty", "messages")
  if len(images) > limits.max_images:
    raise _bad(f"{len(images)} images; this server takes at most {limits.max_images} per request",
               "messages", "too_many_images")
  history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]

  asked = body.get("max_completion_tokens", body.get("max_tokens"))
  max_tokens = _number({"max_tokens": asked}, "max_tokens", int, 1, None,
                       min(defaults.max_tokens, limits.max_tokens))
  if max_tokens > limits.max_tokens:
    raise _bad(f"max_tokens {max_tokens} is more than this server allows ({limits.max_tokens})",
               "max_tokens", "max_tokens_too_large")
  stop = body.get("stop")
  stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
  if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
      or not all(isinstance(s, str) and s for s in stop)):
    raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS}", "stop")
  sampling = defaults.replace(
      temperature=_number(body, "temperature", float, 0.0, 2.0, defaults.temperature),
      top_p=_number(body, "top_p", float, 0.0, 1.0, defaults.top_p, lo_open=True),
      top_k=_number(body, "top_k", int, 0, None, defaults.top_k),
      seed=_number(body, "seed", int, -2**63, 2**63 - 1, defaults.seed),
      stop=tuple(dict.fromkeys(list(defaults.stop) + stop)),
      stop_token_ids=() if _flag(body, "ignore_eos") else defaults.stop_token_ids)
  options = body.get("stream_options") or {}
  return ChatRequest(system="\n".join(system) if system else None, history=history,
                     question=turns[-1][1], images=images, sampling=sampling,
                     max_tokens=max_tokens, stream=_flag(body, "stream"),
                     include_usage=bool(isinstance(options, dict)
                                        and options.get("include_usage")),
                     default_max_tokens=asked is None)


def load_image_url(url: str, limits: Limits):
  """A data: URI or a local path under the image root -> uint8 [H, W, 3]."""
  from data.image import load_image
  try:
    if url.startswith("data:"):
      header, sep, payload = url.partition(",")
      if not sep or not header.endswith(";base64"):
        raise _bad("image_url: a data: URI must be base64 (data:image/png;base64,...)",
                   code="bad_image_url")
      try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
      except (binascii.Error, ValueError):
        raise _bad("image_url: broken base64 in the data: URI", code="bad_base64") from None
      return load_image(raw, max_pixels=limits.max_image_pixels)
    if url.split(":", 1)[0].lower() in ("http", "https", "ftp"):
      raise _bad("image_url: remote URLs are not fetched; send the image as a data: URI "
                 "or as a path under the server's --image-root", code="remote_image_url")
    if limits.image_root is None:
      raise _bad("image_url: local paths are disabled; start the server with --image-root DIR "
                 "or send the image as a data: URI", code="local_paths_disabled")
    path = url[len("file://"):] if url.startswith("file://") else url
    if os.path.isabs(path):  # inside the root or an escape, judged by load_image's root check
      path = os.path.relpath(os.path.abspath(path), os.path.abspath(limits.image_root))
    return load_image(path, root=limits.image_root, max_pixels=limits.max_image_pixels)
  except BadSample as e:
    raise _bad(f"image_url: {e}", code=e.reason) from None


def to_prompt(req: ChatRequest, config, tokenizer, limits: Limits):
  """The Prompt of a parsed request (images decoded, template rendered), checked to fit the
  model's context; a default max_tokens shrinks to what fits."""
  from serve.prompt import build_prompt
  if req.images and config.vision is None:
    raise _bad("this model is text-only; it cannot take images", "messages", "no_vision")
  images = [load_image_url(u, limits) for u in req.images]
  try:
    prompt = build_prompt(config, tokenizer, req.question, images, system=req.system,
                          history=req.history)
  except BadSample as e:
    raise _bad(f"messages: {e}", "messages", e.reason) from None
  context = config.llm.max_positions
  if req.default_max_tokens:
    req.max_tokens = max(1, min(req.max_tokens, context - len(prompt.ids)))
  if len(prompt.ids) + req.max_tokens > context:
    raise _bad(f"the prompt ({len(prompt.ids)} tokens, images included) plus max_tokens "
               f"({req.max_tokens}) exceeds the model's context of {context} tokens",
               "messages", "context_length_exceeded")
  return prompt
