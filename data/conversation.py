"""Conversation templates and loss masks: LLaVA / LLaVA-Med JSON samples -> input_ids + labels.

Each template renders a conversation as pieces (text, trained?). The rendered text is tokenized
as one input (split only where the reference tokenizes separately: at each image, and per message
for Mistral's own format), and each piece gets the tokens that the text up to its end adds to the
text before it; a piece that changes the tokens before it (a merge across a turn boundary) is an
error naming the sample, so the silent "loss stuck at 0" failure of LLaVA-style preprocessing
cannot happen. `<image>` is never tokenized: as in LLaVA's `tokenizer_image_token`, the text is
split at each `<image>` and the image becomes a run of placeholder ids, so the result does not
depend on whether the tokenizer knows `<image>`.

Templates (labels are -100 except on the trained pieces; BOS is an id, never text):
  llama3            <|begin_of_text|>
                    [<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>]
                    <|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>
                    <|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|> ...
                    trained: {a}<|eot_id|>
  vicuna_v1         <s>{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>
                    trained: " {a}</s>" (LLaVA conv_vicuna_v1; system defaults to LLaVA's)
  mistral_instruct  <s>[INST] {q} [/INST] {a}</s>[INST] {q2} [/INST] {a2}</s>
                    trained: " {a}</s>" (a system prompt goes before the first question + "\n\n").
                    Mistral's own format (mistral-common InstructTokenizerV1): every message is
                    its own SentencePiece input, so "[INST]" after "</s>" is tokenized as the
                    start of a text ('▁[') whatever the tokenizer's `legacy` flag says.
  llava_mistral     <s>[INST] [<<SYS>>\n{system}\n<</SYS>>\n\n]{q} [/INST] {a} </s>[INST] {q2} ...
                    trained: " {a} </s>" (LLaVA / LLaVA-Med v1.5 conv_mistral_instruct, a
                    SeparatorStyle.LLAMA_2 template, tokenized as one text like LLaVA's
                    preprocess_llama_2: what LLaVA-Med v1.5 (Mistral) was trained in)
  plain             <s><image>{caption}\n   (stage 1; the human text is dropped as LLaVA does)
                    trained: "{caption}\n"
</s> and <s> stand for the tokenizer's own eos / bos tokens.

Image placement and whitespace (`image_position`; default per template, DEFAULT_IMAGE_POSITION).
Message texts are rendered as the data has them except where the reference code changes them:
  keep        Llama3-Med (llama3med/data/template/base.py renders every message unchanged; its
              llama3_template.py strips only inside its label-length arithmetic): nothing changes,
              each `<image>` stays where it is, no text is stripped.
  first       LLaVA (haotian-liu/LLaVA llava/train/train.py preprocess_multimodal): a human turn
              holding `<image>` becomes ("<image>\n" + text without the marker, stripped), stripped;
              every other turn (answers, turns without an image) is left as is, and
              conversation.get_prompt (SeparatorStyle.TWO / LLAMA_2) strips nothing. Turns with
              several images keep their layout (LLaVA collapses them to one marker, so it cannot
              train them; LLaVA-NeXT skips them).
  first_next  LLaVA-NeXT (LLaVA-VL/LLaVA-NeXT llava/train/train.py preprocess_multimodal): the
              same rewrite, but only of a turn with exactly one `<image>` that does not already
              start with it; a turn starting with `<image>` keeps its whitespace. With llama3
              (LLaVA-NeXT preprocess_llama3 renders through Llama-3's chat template, whose
              `message['content'] | trim` strips every message) every text is stripped too.
`plain` keeps the caption as is (LLaVA preprocess_plain, Llama3-Med pretrain_template.py).
Inference prompts (render_prompt) follow the same rule as training, so a prompt is what the model
saw before its answers (LLaVA's eval scripts prepend "<image>\n" to the raw question instead: the
same tokens unless the question has leading or trailing whitespace).
"""
from __future__ import annotations

import re
import weakref
from typing import Optional, Sequence, Union

import numpy as np

from data.errors import BadSample, UserError
# The system prompts live with the configs that record them (a preset, a LLaVA-NeXT import).
from vlm.config import LLAMA3_MED_SYSTEM, LLAVA_NEXT_LLAMA3_SYSTEM  # noqa: F401

TEMPLATES = ("llama3", "vicuna_v1", "mistral_instruct", "llava_mistral", "plain")
IMAGE_POSITIONS = ("keep", "first", "first_next")
# What a checkpoint trained without an explicit position used: Llama3-Med (llama3) keeps the data's
# placement, the LLaVA-family templates put the image first.
DEFAULT_IMAGE_POSITION = {"llama3": "keep", "vicuna_v1": "first", "mistral_instruct": "first",
                          "llava_mistral": "first", "plain": "first"}
IMAGE = "<image>"
IGNORE = -100  # label of a token the loss skips (PyTorch's cross-entropy ignore_index)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA3_BOS, LLAMA3_EOT, LLAMA3_EOS = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
LLAMA3_SH, LLAMA3_EH = "<|start_header_id|>", "<|end_header_id|>"
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}

ImageTokens = Union[int, Sequence[int]]


# --- per-tokenizer facts (computed once per tokenizer object) ---------------------------------

class _Spec:
  """What a template needs from a tokenizer: bos id, end-of-answer string, special strings."""

  def __init__(self, tokenizer, template: str):
    vocab = tokenizer.get_vocab()
    if template == "llama3":
      missing = [t for t in (LLAMA3_BOS, LLAMA3_SH, LLAMA3_EH, LLAMA3_EOT) if t not in vocab]
      if missing:
        raise UserError(f"template llama3 needs tokenizer tokens {missing}")
      self.bos_id, self.end = vocab[LLAMA3_BOS], LLAMA3_EOT
      self.stops = [vocab[t] for t in (LLAMA3_EOT, LLAMA3_EOS) if t in vocab]
    else:
      self.bos_id = tokenizer.bos_token_id
      self.end = "\n" if template == "plain" else tokenizer.eos_token
      if self.end is None:
        raise UserError(f"template {template} needs a tokenizer with an eos_token")
      self.stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    specials = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials.discard(IMAGE)
    self.specials = sorted(specials, key=len, reverse=True)
    self.special_re = re.compile("|".join(map(re.escape, self.specials))) if specials else None


_SPECS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _spec(tokenizer, template: str) -> _Spec:
  if template not in TEMPLATES:
    raise UserError(f"unknown template {template!r}; choose from {TEMPLATES}")
  per_tok = _SPECS.setdefault(tokenizer, {})
  if template not in per_tok:
    per_tok[template] = _Spec(tokenizer, template)
  return per_tok[template]


def stop_token_ids(tokenizer, template: str) -> list:
  """Token ids that end generation: llama3 <|eot_id|> and <|end_of_text|>, else the eos token."""
  return list(_spec(tokenizer, template).stops)


# --- sample validation ---------------------------------------------------------------------------

def _bad(reason, message, sid):
  return BadSample(reason, message, sample_id=sid)


def image_position_for(template: str, position: Optional[str] = None) -> str:
  """The placement rule in force: `position`, else the template's default."""
  position = position or DEFAULT_IMAGE_POSITION.get(template)
  if position not in IMAGE_POSITIONS:
    raise ValueError(f"unknown image_position {position!r}; choose from {IMAGE_POSITIONS}")
  return position


def _render_text(text: str, human: bool, template: str, position: str) -> str:
  """One message text as the reference code of (template, position) renders it (module
  docstring): the image placement rule on human turns, Llama-3's chat-template trim for
  LLaVA-NeXT's llama3."""
  if human and text.count(IMAGE) == 1 and (
      position == "first" or (position == "first_next" and not text.startswith(IMAGE))):
    rest = text.replace(IMAGE, "").strip()
    text = f"{IMAGE}\n{rest}" if rest else IMAGE
  if template == "llama3" and position == "first_next":
    text = text.strip()
  return text


def _n_images(sample: dict) -> int:
  img = sample.get("image")
  if not img:
    return 0
  return len(img) if isinstance(img, (list, tuple)) else 1


def _pairs(sample, spec: _Spec, sid, template: str, position: str) -> list:
  """Validated (question, answer) pairs, rendered by `_render_text`; raises BadSample."""
  if not isinstance(sample, dict):
    raise _bad("malformed", f"sample is a {type(sample).__name__}, not an object", sid)
  conv = sample.get("conversations", sample.get("conversatons"))
  if not isinstance(conv, list):
    raise _bad("malformed", "no 'conversations' list", sid)
  turns = []
  for i, t in enumerate(conv):
    role = _ROLES.get(str(t.get("from")).lower()) if isinstance(t, dict) else None
    if role is None or not isinstance(t.get("value"), str):
      raise _bad("malformed", f"turn {i} is not {{'from': human|gpt, 'value': str}}: {t!r:.80}",
                 sid)
    turns.append((role, t["value"]))
  if not turns or not any(v.strip() for _, v in turns):
    raise _bad("empty_conversation", "no turns with text", sid)
  roles = {r for r, _ in turns}
  if roles != {"human", "gpt"}:
    raise _bad("one_sided", f"only {sorted(roles)} turns", sid)
  for i, (role, value) in enumerate(turns):
    want = ("human", "gpt")[i % 2]
    if role != want:
      raise _bad("malformed", f"turn {i} is from {role}, expected {want}", sid)
    if role == "gpt" and (not value.strip() or IMAGE in value):
      raise _bad("malformed", f"turn {i}: empty answer or <image> in an answer", sid)
    if spec.special_re is not None and spec.special_re.search(value):
      raise _bad("malformed", f"turn {i} contains a special token "
                 f"{spec.special_re.search(value).group()!r}", sid)
  if len(turns) % 2:
    raise _bad("malformed", "ends with an unanswered human turn", sid)
  n_img, n_mark = _n_images(sample), sum(v.count(IMAGE) for _, v in turns)
  if n_img and not n_mark:  # VQA files without a marker: the image goes first, as LLaVA does
    turns[0] = ("human", IMAGE + "\n" + turns[0][1])
  elif n_mark != n_img:
    raise _bad("malformed", f"{n_mark} <image> markers for {n_img} images", sid)
  return [(_render_text(turns[i][1], True, template, position),
           _render_text(turns[i + 1][1], False, template, position))
          for i in range(0, len(turns), 2)]


# --- templates: pairs -> pieces (text, trained, fresh) -------------------------------------------

def _pieces(template: str, pairs: list, spec: _Spec, system: Optional[str]) -> list:
  """`pairs` is [(question, answer)]; answer None ends the text at the assistant header. A fresh
  piece starts a new tokenizer input (no continuation of the text before it)."""
  out = []
  if template == "llama3":
    head = lambda role: f"{LLAMA3_SH}{role}{LLAMA3_EH}\n\n"
    if system:
      out.append((head("system") + system + LLAMA3_EOT, False, False))
    for q, a in pairs:
      out.append((head("user") + q + LLAMA3_EOT + head("assistant"), False, False))
      if a is not None:
        out.append((a + LLAMA3_EOT, True, False))
  elif template == "vicuna_v1":
    system = VICUNA_SYSTEM if system is None else system
    for i, (q, a) in enumerate(pairs):
      prefix = system + " " if i == 0 and system else ""
      out.append((f"{prefix}USER: {q} ASSISTANT:", False, False))
      if a is not None:
        out.append((f" {a}{spec.end}", True, False))
  elif template in ("mistral_instruct", "llava_mistral"):
    llava = template == "llava_mistral"
    for i, (q, a) in enumerate(pairs):
      if i == 0 and system:
        q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}" if llava else f"{system}\n\n{q}"
      # mistral-common encodes each message on its own; LLaVA tokenizes the whole text
      out.append((f"[INST] {q} [/INST]", False, not llava))
      if a is not None:
        out.append((f" {a} {spec.end}" if llava else f" {a}{spec.end}", True, False))
  else:  # plain
    out.append((IMAGE * pairs[0][0].count(IMAGE), False, False))
    if pairs[0][1] is not None:
      out.append((pairs[0][1] + spec.end, True, False))
  return out


# --- tokenization --------------------------------------------------------------------------------

def _encode_batch(tokenizer, texts: list) -> list:
  """Ids of each text without BOS/EOS; straight through the Rust tokenizer when there is one,
  in one SentencePiece call for data.slow_tokenizer's."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
  if hasattr(tokenizer, "encode_batch"):
    return tokenizer.encode_batch(texts)
  return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _tokenize(pieces: list, tokenizer, specials: list, sid) -> list:
  """-> items [kind, ids, trained], kind 'image' (ids None) or 'text'. A chunk (the text between
  images and fresh pieces) is one tokenizer input, the reference. A later piece's ids are what it
  adds to its context, the two tokenized as one text (SentencePiece gives a piece alone a leading
  '▁' it does not have inside the text); linear in the length, not quadratic. Raises
  BadSample('template_mismatch') when a piece changes the tokens before it or the pieces do not
  add up to the chunk's tokens (a merge across a boundary): no label straddles two turns."""
  items, chunks = [], [[]]
  for text, trained, fresh in pieces:
    if fresh and chunks[-1]:
      chunks.append([])
    for j, part in enumerate(text.split(IMAGE)):
      if j:
        items.append(["image", None, False])
        chunks.append([])
      if part:
        chunks[-1].append(part)
        items.append(["text", None, trained])
  chunks = [c for c in chunks if c]
  # each later piece is tokenized behind its context: the special token the piece before ends
  # with, else that whole piece
  ctx = lambda prev: next((s for s in specials if prev.endswith(s)), prev)
  texts = [t for c in chunks for k in range(len(c))
           for t in ([ctx(c[k - 1]), ctx(c[k - 1]) + c[k]] if k else c[:1] if len(c) > 1 else [])]
  texts += ["".join(c) for c in chunks]
  unique = list(dict.fromkeys(texts))   # a first piece is often the second one's context too
  ids_of = dict(zip(unique, _encode_batch(tokenizer, unique) if unique else []))
  enc = iter([ids_of[t] for t in texts])
  per_chunk = []
  for c in chunks:
    got = [list(next(enc)) if len(c) > 1 else None]   # None: a one-piece chunk, its whole text
    for k in range(1, len(c)):
      before, pair = list(next(enc)), list(next(enc))
      if pair[:len(before)] != before:
        raise _mismatch(tokenizer, sid, f"{c[k][:30]!r} changes the tokens of {c[k - 1][-30:]!r}",
                        before, pair)
      got.append(pair[len(before):])
    per_chunk.append(got)
  for c, got in zip(chunks, per_chunk):
    whole = list(next(enc))
    if got == [None]:
      got[0] = whole
    flat = [t for ids in got for t in ids]
    if flat != whole:
      raise _mismatch(tokenizer, sid, f"per-turn tokens differ from those of {''.join(c)[:50]!r}",
                      flat, whole)
  texts = iter(ids for got in per_chunk for ids in got)
  for it in items:
    if it[0] == "text":
      it[1] = next(texts)
  return items


def _mismatch(tokenizer, sid, what: str, a: list, b: list):
  i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  show = lambda ids: tokenizer.convert_ids_to_tokens(ids[max(i - 3, 0):i + 4])
  return _bad("template_mismatch", f"{what} at token {i}: {show(a)} vs {show(b)}", sid)


def _counts(image_tokens: ImageTokens, n: int, sid) -> list:
  counts = [image_tokens] * n if isinstance(image_tokens, (int, np.integer)) else list(image_tokens)
  if len(counts) != n or any(int(c) < 1 for c in counts):
    raise _bad("malformed", f"{n} images but image_tokens={image_tokens!r}", sid)
  return [int(c) for c in counts]


def _assemble(items, spec, image_tokens, image_token_id, sid):
  n_img = sum(it[0] == "image" for it in items)
  counts = iter(_counts(image_tokens, n_img, sid) if n_img else [])
  ids, labels, image_end = [], [], 0
  if spec.bos_id is not None:
    ids.append(spec.bos_id)
    labels.append(IGNORE)
  for kind, toks, trained in items:
    if kind == "image":
      toks = [image_token_id] * next(counts)
      image_end = len(ids) + len(toks)
    ids += toks
    labels += toks if trained else [IGNORE] * len(toks)
  return ids, labels, image_end


def encode(sample: dict, tokenizer, template: str, *, image_tokens: ImageTokens,
           image_token_id: int, system: Optional[str] = None,
           image_position: Optional[str] = None, max_len: Optional[int] = None) -> dict:
  """LLaVA / LLaVA-Med sample -> {"input_ids": int32[T], "labels": int32[T]}.

  labels equal input_ids on trained tokens and -100 elsewhere, aligned (not shifted: the loss
  shifts). Each <image> becomes `image_tokens` copies of `image_token_id` (an int, or one count
  per image for anyres). `system` None means the template's default (LLaVA's for vicuna_v1, none
  otherwise); "" means none. `image_position` (IMAGE_POSITIONS) None means the template's
  default (DEFAULT_IMAGE_POSITION). Truncation to `max_len` never cuts an image's placeholders and
  never leaves a sample without trained tokens: such a sample raises BadSample('too_long').
  """
  sid = sample.get("id") if isinstance(sample, dict) else None
  spec = _spec(tokenizer, template)
  position = image_position_for(template, image_position)
  pairs = _pairs(sample, spec, sid, template, position)
  if template == "plain":
    if len(pairs) != 1 or IMAGE not in pairs[0][0]:
      raise _bad("malformed", "plain template needs one image and exactly one caption turn", sid)
  _check_system(system, spec, sid)
  system = _render_text(system, False, template, position) if system else system
  items = _tokenize(_pieces(template, pairs, spec, system), tokenizer, spec.specials, sid)
  ids, labels, image_end = _assemble(items, spec, image_tokens, image_token_id, sid)
  return _cut({"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32)},
              max_len, image_end, sid)


def truncate(enc: dict, max_len: Optional[int], image_token_id: int, sample_id=None) -> dict:
  """`encode`'s cut to max_len applied to an uncut encoding (`encode(..., max_len=None)`), so a
  caller can see the length before the cut (train.validate) and still get what training gets."""
  img = np.flatnonzero(enc["input_ids"] == image_token_id)
  return _cut(enc, max_len, int(img[-1]) + 1 if len(img) else 0, sample_id)


def _cut(enc: dict, max_len: Optional[int], image_end: int, sid) -> dict:
  ids, labels = enc["input_ids"], enc["labels"]
  if max_len is None or len(ids) <= max_len:
    return enc
  if image_end > max_len:
    raise _bad("too_long", f"{len(ids)} tokens; an image ends at {image_end} > max_len {max_len}",
               sid)
  if (labels[:max_len] == IGNORE).all():
    raise _bad("too_long", f"no trained token left within max_len {max_len}", sid)
  return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def _check_system(system, spec, sid):
  if system and (IMAGE in system or (spec.special_re and spec.special_re.search(system))):
    raise _bad("malformed", "system prompt contains <image> or a special token", sid)


def render_prompt(question: str, tokenizer, template: str, *, image_tokens: ImageTokens,
                  image_token_id: int, system: Optional[str] = None,
                  image_position: Optional[str] = None,
                  history: Sequence[tuple] = ()) -> np.ndarray:
  """Generation prompt ids: the conversation up to the assistant header, images expanded, placed
  and prompted as encode() does in training. `history` holds the earlier (question, answer) turns
  of a multi-turn chat, rendered as training renders them. Without any <image> marker, the images
  go in front of the first question (as LLaVA's eval and cli do); image_tokens=0 means a
  text-only prompt."""
  spec = _spec(tokenizer, template)
  position = image_position_for(template, image_position)
  scalar = isinstance(image_tokens, (int, np.integer))
  n_given = (1 if image_tokens else 0) if scalar else len(image_tokens)
  questions = [str(q) for q, _ in history] + [question]
  answers = [str(a).strip() for _, a in history] + [None]
  if n_given and not any(IMAGE in q for q in questions):
    questions[0] = IMAGE * n_given + "\n" + questions[0]
  for text in questions + answers[:-1]:
    if spec.special_re is not None and spec.special_re.search(text):
      raise _bad("malformed", f"{'question' if text in questions else 'answer'} contains a "
                 f"special token {spec.special_re.search(text).group()!r}", "prompt")
  if any(IMAGE in a for a in answers[:-1]):
    raise _bad("malformed", "<image> in an answer", "prompt")
  _check_system(system, spec, "prompt")
  system = _render_text(system, False, template, position) if system else system
  pairs = [(_render_text(q, True, template, position),
            None if a is None else _render_text(a, False, template, position))
           for q, a in zip(questions, answers)]
  if template == "plain" and (history or IMAGE not in pairs[0][0]):
    raise _bad("malformed", "plain template needs an image and takes one turn", "prompt")
  items = _tokenize(_pieces(template, pairs, spec, system), tokenizer, spec.specials, "prompt")
  ids, _, _ = _assemble(items, spec, image_tokens, image_token_id, "prompt")
  return np.asarray(ids, np.int32)
