"""OpenAI chat-completions requests -> generation prompts and per-choice sampling.

Messages (text and `image_url` parts) become a conversation in the model's template: system
messages the system prompt, earlier user/assistant turns the history, the last user message the
question; each image part is an `<image>` marker where the part stands. Images come from data:
URIs (base64; PNG, JPEG, DICOM...) or, when the server has an image root, from local paths inside
it. Every other request parameter goes through TABLE: honoured (checked against its range, then
carried to the engine's sampler) or refused with a 400 naming it; a parameter TABLE does not know
is refused too, so nothing a client asks for is dropped in silence. Every problem is an ApiError
(a 4xx with a one-line message), raised before the request reaches the model, so a bad request
costs nothing and the server keeps serving.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
from typing import Any, Optional

from data.conversation import IMAGE
from data.errors import BadSample

MAX_STOP_STRINGS = 4      # OpenAI's limits
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_N = 8                 # choices per request (each is a row of the engine)
MAX_ID_CHARS = 512        # user, safety_identifier, prompt_cache_key
SEED_BITS = 63            # seeds are taken modulo 2**63 (OpenAI's are int64)


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
  n: int = 1
  tags: dict = dataclasses.field(default_factory=dict)   # user, safety_identifier,
                                                        # prompt_cache_key: logged

  def choice_sampling(self, index: int):
    """Choice `index`'s SamplingParams (max_tokens set): seed + index, so choice 0 of n is the
    n=1 answer; without a seed each choice draws a fresh one."""
    seed = self.sampling.seed
    return self.sampling.replace(max_tokens=self.max_tokens,
                                 seed=None if seed is None else (seed + index) % 2**SEED_BITS)


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
  return ApiError(400, message, param=param, code=code)


# --- the parameter table ---------------------------------------------------------------------------
# Every OpenAI chat-completions request parameter (and vLLM's top_k / ignore_eos) maps to a check
# that returns its parsed value or raises a 400 naming it; a parameter not in the table is refused
# as unsupported. `null` reads as absent (the OpenAI API does the same).

def _number(kind, lo, hi, *, lo_open: bool = False):
  def check(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (kind is int and x != int(x)):
      raise _bad(f"{name} must be {'an integer' if kind is int else 'a number'}, got {x!r:.40}",
                 name)
    if x < lo or (lo_open and x == lo) or (hi is not None and x > hi):
      raise _bad(f"{name} must be in {'(' if lo_open else '['}{lo}, "
                 f"{hi if hi is not None else 'inf'}], got {x}", name)
    return kind(x)
  return check


def _flag(name, x):
  if not isinstance(x, bool):
    raise _bad(f"{name} must be true or false, got {x!r:.40}", name)
  return x


def _string(name, x):
  if not isinstance(x, str) or len(x) > MAX_ID_CHARS:
    raise _bad(f"{name} must be a string of at most {MAX_ID_CHARS} characters", name)
  return x


def _stop(name, x):
  stop = [x] if isinstance(x, str) else x
  if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
      or not all(isinstance(s, str) and s for s in stop)):
    raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS}", name)
  return stop


def _logit_bias(name, x):
  if not isinstance(x, dict) or len(x) > MAX_LOGIT_BIAS:
    raise _bad(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids -> bias",
               name)
  for k, v in x.items():
    if not (isinstance(k, str) and k.isdigit()):
      raise _bad(f"logit_bias: {k!r:.30} is not a token id", name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
      raise _bad(f"logit_bias[{k}] must be a number in [-100, 100], got {v!r:.30}", name)
  return {int(k): float(v) for k, v in x.items()}


def _stream_options(name, x):
  if not isinstance(x, dict):
    raise _bad("stream_options must be an object", name)
  for key, value in x.items():
    if key not in ("include_usage", "include_obfuscation"):
      raise _bad(f"stream_options.{key} is not supported (include_usage is)", name)
    _flag(f"stream_options.{key}", value)
  if x.get("include_obfuscation"):
    raise _bad("stream_options.include_obfuscation: this server does not pad stream chunks; "
               "send false", name)
  return bool(x.get("include_usage"))


def _only(*allowed, why: str):
  """Accepted where the value asks for what this server does anyway; refused otherwise."""
  def check(name, x):
    if x not in allowed:
      raise _bad(f"{name}={str(json.dumps(x))[:60]} is not supported: {why}", name)
    return x
  return check


def _refused(why: str):
  def check(name, x):
    raise _bad(f"{name} is not supported: {why}", name)
  return check


def _given(name, x):
  return x


NO_TOOLS = "this server does not implement tool or function calling"
TABLE = {
    "model": _given,                        # the served model's name, else 404 (server.py)
    "messages": _given,                     # parsed by parse()
    "max_completion_tokens": _number(int, 1, None),
    "max_tokens": _number(int, 1, None),    # OpenAI's older name of max_completion_tokens
    "temperature": _number(float, 0.0, 2.0),
    "top_p": _number(float, 0.0, 1.0, lo_open=True),
    "top_k": _number(int, -1, None),        # vLLM: 0 or -1 = off
    "seed": _number(int, -2**63, 2**63 - 1),
    "stop": _stop,
    "stream": _flag,
    "stream_options": _stream_options,
    "n": _number(int, 1, MAX_N),
    "logprobs": _flag,
    "top_logprobs": _number(int, 0, MAX_TOP_LOGPROBS),
    "presence_penalty": _number(float, -2.0, 2.0),
    "frequency_penalty": _number(float, -2.0, 2.0),
    "logit_bias": _logit_bias,
    "ignore_eos": _flag,                    # vLLM: stop tokens do not end the answer
    "user": _string,                        # the three: logged with the request id; no
    "safety_identifier": _string,           # effect on the answer (none at OpenAI either;
    "prompt_cache_key": _string,            # prefixes are reused here without a key)
    "response_format": _only({"type": "text"}, why="answers are plain text (no JSON mode or "
                             "schema-constrained decoding)"),
    "modalities": _only(["text"], why="the answers are text only"),
    "service_tier": _only("auto", "default", why="one tier is served"),
    "store": _only(False, why="completions are not stored"),
    "prompt_cache_retention": _only("in_memory", why="prefixes are kept in memory only"),
    "tools": _refused(NO_TOOLS),
    "tool_choice": _refused(NO_TOOLS),
    "parallel_tool_calls": _refused(NO_TOOLS),
    "functions": _refused(NO_TOOLS),
    "function_call": _refused(NO_TOOLS),
    "audio": _refused("answers are text only"),
    "prediction": _refused("predicted outputs are not implemented"),
    "reasoning_effort": _refused("the model does not reason in a separate channel"),
    "verbosity": _refused("the model's answer length is not steered"),
    "web_search_options": _refused("this server does not search the web"),
    "metadata": _refused("metadata is kept with stored completions, and none are stored"),
}


def _params(body: dict) -> dict:
  """The request's parameters, each checked by its TABLE entry (absent or null: left out)."""
  unknown = [k for k in body if k not in TABLE]
  if unknown:
    raise _bad(f"{unknown[0]} is not supported by this server (an unknown or unimplemented "
               "OpenAI chat-completions parameter)", unknown[0], "unsupported_parameter")
  return {k: TABLE[k](k, v) for k, v in body.items() if v is not None}


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
      if isinstance(ref, dict) and ref.get("detail") not in (None, "auto"):
        raise _bad(f"{here}.image_url.detail: only auto is supported (the model sees every "
                   "image at its own resolution)", here)
      images.append(url)
      out.append(IMAGE)
    else:
      raise _bad(f"{here}: unsupported part type {kind!r} (text and image_url are)", here)
  return "\n".join(out)


def _messages(messages) -> tuple:
  """(system, [(role, text)] turns, image URLs) of the messages list."""
  if not isinstance(messages, list) or not messages:
    raise _bad("messages must be a non-empty list", "messages")
  system, turns, images = [], [], []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    role = m.get("role") if isinstance(m, dict) else None
    extra = [k for k, v in (m.items() if role else ()) if k not in ("role", "content")
             and v not in (None, [], {})]
    if extra:
      raise _bad(f"{where}.{extra[0]} is not supported (messages carry role and content)",
                 f"{where}.{extra[0]}")
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
  return system, turns, images


def parse(body: Any, defaults, limits: Limits) -> ChatRequest:
  """A decoded JSON body -> ChatRequest; `defaults` is the server's SamplingParams."""
  if not isinstance(body, dict):
    raise _bad("the request body must be a JSON object")
  p = _params(body)
  system, turns, images = _messages(body.get("messages"))
  if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
    raise _bad("the conversation must start and end with a user message", "messages")
  if not turns[-1][1].replace(IMAGE, "").strip() and IMAGE not in turns[-1][1]:
    raise _bad("the last user message is empty", "messages")
  if len(images) > limits.max_images:
    raise _bad(f"{len(images)} images; this server takes at most {limits.max_images} per request",
               "messages", "too_many_images")
  history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]

  if p.get("max_tokens", p.get("max_completion_tokens")) != p.get("max_completion_tokens",
                                                                   p.get("max_tokens")):
    raise _bad("max_tokens and max_completion_tokens differ; send one", "max_tokens")
  asked = p.get("max_completion_tokens", p.get("max_tokens"))
  max_tokens = min(defaults.max_tokens, limits.max_tokens) if asked is None else asked
  if max_tokens > limits.max_tokens:
    raise _bad(f"max_tokens {max_tokens} is more than this server allows ({limits.max_tokens})",
               "max_tokens", "max_tokens_too_large")
  if "top_logprobs" in p and not p.get("logprobs"):
    raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
  if "stream_options" in p and not p.get("stream"):
    raise _bad("stream_options is only allowed with stream: true", "stream_options")
  sampling = defaults.replace(
      temperature=p.get("temperature", defaults.temperature),
      top_p=p.get("top_p", defaults.top_p),
      top_k=max(0, p.get("top_k", defaults.top_k)),
      seed=p["seed"] % 2**SEED_BITS if "seed" in p else defaults.seed,  # None: fresh per request
      stop=tuple(dict.fromkeys(list(defaults.stop) + p.get("stop", []))),
      stop_token_ids=() if p.get("ignore_eos") else defaults.stop_token_ids,
      presence_penalty=p.get("presence_penalty", 0.0),
      frequency_penalty=p.get("frequency_penalty", 0.0),
      logit_bias=p.get("logit_bias", {}),
      logprobs=p.get("logprobs", False),
      top_logprobs=p.get("top_logprobs", 0))
  return ChatRequest(system="\n".join(system) if system else None, history=history,
                     question=turns[-1][1], images=images, sampling=sampling,
                     max_tokens=max_tokens, stream=p.get("stream", False),
                     include_usage=p.get("stream_options", False),
                     default_max_tokens=asked is None, n=p.get("n", 1),
                     tags={k: p[k] for k in ("user", "safety_identifier", "prompt_cache_key")
                           if k in p})


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
  vocab = config.llm.vocab_size
  if any(t >= vocab for t in req.sampling.logit_bias):
    raise _bad(f"logit_bias: token ids must be below the vocabulary size {vocab}", "logit_bias")
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
