"""`python -m evaluation.vqa run`: zero-shot answers to a VQA benchmark, written as LLaVA-Med does.

Questions come from a TFDS build (`python -m data.tfds_builders build NAME ...`; --dataset +
--data-dir) or a LLaVA-Med test.json + image folder (--test-json + --image-root). They run through
the serving engine (serve/engine.py: --slots questions decoded at once, a new one prefilled as
soon as one ends), and each answer is appended to the output JSONL and flushed as soon as its
question is done, one row per question:
  {"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}
so a rerun with the same --out skips the ids already answered (a row cut short by a kill is
dropped and answered again). Defaults follow the papers: greedy, max_new_tokens 1024.

Everything that can be checked is checked before the model loads: the questions file, every
question's text (an empty one is an error) and image (a file inside --image-root), and --ckpt (a
checkpoint dir, a HF model dir, or a train.main workdir: serve.workdir.resolve).
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Callable, Iterator, NamedTuple, Optional

from data.errors import BadSample, UserError
from data.jsonfile import JsonlStore, write_json

DATASETS = ("vqa_rad", "slake", "path_vqa")
IMAGE = "<image>"


class Question(NamedTuple):
  qid: object  # as the source spells it (answers keep the type: LLaVA-Med ids are ints)
  text: str  # the human turn; an <image> marker, if any, says where the image goes
  image: Callable  # () -> uint8 [H, W, 3]
  answer: str
  answer_type: str
  image_ref: Optional[str] = None  # the image path relative to --image-root (test.json)


# --- sources -------------------------------------------------------------------------------------

def tfds_questions(name: str, data_dir: str, split: str = "test") -> Iterator[Question]:
  import tensorflow_datasets as tfds

  import data.tfds_builders  # noqa: F401  (registers the builders)
  if name not in DATASETS:
    raise UserError(f"--dataset must be one of {DATASETS}, got {name!r}")
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for a missing or partial build
    raise BadSample("missing_dataset", f"no {name}/{split} build in {data_dir} ({e})"[:500],
                    path=data_dir) from None
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  for i in range(len(src)):
    r = src[i]
    yield Question(text(r["id"]), text(r["question"]), (lambda img=r["image"]: img),
                   text(r["answer"]), text(r["answer_type"]))


def test_json_questions(path: str, image_root: str) -> Iterator[Question]:
  """LLaVA-Med test.json ([{id, image, conversations|conversatons, answer_type}]), or the flat rows
  `data.ldrt` writes to eval.jsonl ({question_id, image, question, answer}; open-ended)."""
  from data.image import load_image
  from evaluation.records import gt_answer, read_by_id
  rows = read_by_id(path)  # duplicate ids: error
  for key, r in rows.items():
    if "conversations" not in r and "conversatons" not in r and isinstance(r.get("question"), str):
      q, kind, answer = r["question"], str(r.get("answer_type", "OPEN")), str(r.get("answer", ""))
    else:
      kind, answer = gt_answer(r, key, path)
      conv = r.get("conversations", r.get("conversatons"))
      q = conv[0].get("value") if isinstance(conv[0], dict) else None
      if not isinstance(q, str) or conv[0].get("from") != "human":
        raise BadSample("malformed_sample", "conversations[0] must be the human question",
                        sample_id=key, path=path)
    if not isinstance(r.get("image"), str):
      raise BadSample("malformed_sample", "no 'image' path", sample_id=key, path=path)
    yield Question(r.get("id", r.get("question_id")), q,
                   (lambda im=r["image"], k=key: load_image(im, root=image_root, sample_id=k)),
                   answer, kind, r["image"])


def check_question(q: Question, image_root: Optional[str], source: str) -> None:
  """What can be known before the model loads: the question has text, and its image file (a
  test.json path) exists inside the image root. Raises BadSample naming `source` and the id."""
  from data.image import resolve_path
  if not prompt_text(q.text):
    raise BadSample("empty_question", "the question is empty", sample_id=q.qid, path=source)
  if q.image_ref is None:
    return
  try:
    found = resolve_path(q.image_ref, image_root, q.qid).is_file()
  except BadSample as e:
    raise BadSample(e.reason, f"{e.message}: {q.image_ref}", sample_id=q.qid,
                    path=source) from None
  if not found:
    raise BadSample("missing_image", f"no image file {q.image_ref} under the image root "
                    f"{image_root}", sample_id=q.qid, path=source)


def write_gt(questions: list, path: str) -> None:
  """The questions as a LLaVA-Med test.json, so `score --gt` can read a TFDS run's truth."""
  rows = [{"id": q.qid, "image": str(q.qid), "answer_type": q.answer_type,
           "conversations": [{"from": "human", "value": q.text},
                             {"from": "gpt", "value": q.answer}]} for q in questions]
  write_json(path, rows)


# --- the run -------------------------------------------------------------------------------------

def prompt_text(question: str) -> str:
  """What LLaVA-Med writes as `prompt`: the question without the image marker."""
  return question.replace(IMAGE, "").strip()


def run(args) -> dict:
  from serve import workdir
  from vlm import compile_cache
  from serve.engine import Request
  from serve.generate import Generator, layout_from_args, sampling_params
  from serve.prompt import build_prompt

  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  params = sampling_params(args)   # the flags, checked before anything is read
  if args.test_json:
    if not args.image_root:
      raise UserError("--test-json needs --image-root")
    if not os.path.isdir(args.image_root):
      raise UserError(f"--image-root {args.image_root} is not a directory")
    source = args.test_json
    questions = list(test_json_questions(args.test_json, args.image_root))
  elif args.dataset and args.data_dir:
    source = f"tfds:{args.dataset}:{args.split} in {args.data_dir}"
    questions = list(tfds_questions(args.dataset, args.data_dir, args.split))
  else:
    raise UserError("give --dataset and --data-dir, or --test-json and --image-root")
  if not questions:
    raise UserError(f"no questions in {source}")
  ckpt = workdir.resolve(args.ckpt)   # a training workdir stands for the model it wrote
  if args.gt_out:
    write_gt(questions, args.gt_out)
  store = JsonlStore(args.out, key="question_id")
  done = {str(k) for k in store.load()}  # a row cut short by a kill is dropped: answered again
  stats = {"questions": len(questions), "answered_before": len(done), "answered": 0,
           "skipped": 0}
  todo = []
  for q in questions:
    if str(q.qid) in done:
      continue
    try:
      check_question(q, args.image_root, source)
      todo.append(q)
    except BadSample as e:
      if not args.lenient:
        raise
      stats["skipped"] += 1
      log(f"skipped: {e}")
  if args.limit is not None:
    todo = todo[:args.limit]
  log(f"{len(questions)} questions, {len(done)} already answered in {args.out}, "
      f"{len(todo)} to answer now" + (f", {stats['skipped']} skipped" if stats["skipped"] else ""))
  if not todo:
    return stats
  cache = compile_cache.enable()
  if cache:
    log(f"compilation cache: {cache}")
  mesh = None
  if args.mesh:
    from vlm.sharding import make_mesh
    mesh = make_mesh([int(x) for x in args.mesh.split(",")])
  if ckpt != args.ckpt:
    log(f"model: {ckpt}")
  gen = Generator.from_checkpoint(ckpt, mesh=mesh, dtype=args.dtype)
  engine = gen.engine(layout_from_args(args, gen.config, gen.cache_dtype))
  model_id = args.model_id or os.path.basename(os.path.normpath(args.ckpt))
  t0 = time.time()

  failed = []

  def answered(q):
    def on_event(event):
      if event.error:
        failed.append(f"question {q.qid!r}: {event.error}")
      if event.done is None:
        return
      store.append({"question_id": q.qid, "prompt": prompt_text(q.text),
                    "text": event.done.text, "answer_id": uuid.uuid4().hex,
                    "model_id": model_id, "metadata": {}})
      stats["answered"] += 1
      if stats["answered"] % args.slots == 0 or stats["answered"] == len(todo):
        log(f"answered {stats['answered']}/{len(todo)} ({time.time() - t0:.0f} s)")
    return on_event

  def requests():
    for q in todo:
      try:
        prompt = build_prompt(gen.config, gen.tokenizer, q.text, [q.image()], system=args.system)
        req = Request(prompt, params, answered(q))
        engine.check(req)
      except BadSample as e:
        if not args.lenient:
          raise BadSample(e.reason, e.message + (f": {e.path}" if e.path else ""),
                          sample_id=q.qid, path=source) from None
        stats["skipped"] += 1
        log(f"skipped {q.qid}: {e}")
        continue
      except UserError as e:
        if not args.lenient:
          raise UserError(f"question {q.qid!r}: {e}") from None
        stats["skipped"] += 1
        log(f"skipped {q.qid}: {e}")
        continue
      yield req

  with store:
    engine.run(requests())
  if failed:
    raise RuntimeError(failed[0])
  return stats


def add_parser(sub) -> None:
  p = sub.add_parser(
      "run", help="zero-shot answers to a VQA benchmark (resumable JSONL, LLaVA-Med format)",
      description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True, help="checkpoint dir of this project, a HF model dir, "
                 "or a train.main workdir (its final model; a chained run's last stage)")
  p.add_argument("--dataset", choices=DATASETS, help="TFDS build to read (with --data-dir)")
  p.add_argument("--data-dir", help="TFDS data dir written by `python -m data.tfds_builders build`")
  p.add_argument("--split", default="test")
  p.add_argument("--test-json", help="LLaVA-Med test.json instead of a TFDS build")
  p.add_argument("--image-root", help="folder the test.json image paths are relative to")
  p.add_argument("--out", required=True, help="answers JSONL (appended to; rerun to resume)")
  p.add_argument("--gt-out", help="also write the questions as a LLaVA-Med test.json (the "
                 "ground truth `score --gt` reads; useful with TFDS builds)")
  p.add_argument("--model-id", help="model_id written in each row (default: the ckpt dir name)")
  from serve.generate import add_engine_args, add_sampling_args
  add_engine_args(p, slots=8)
  add_sampling_args(p, max_new_tokens=1024)  # the papers' zero-shot setting: greedy, 1024
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default float32); a HF dir's weights are cast to it")
  p.add_argument("--mesh", help="data,fsdp,tensor mesh shape, e.g. 1,-1,1 (default: one device)")
  p.add_argument("--limit", type=int, help="answer at most this many new questions, then stop")
  p.add_argument("--lenient", action="store_true",
                 help="skip (and count) questions that are empty or whose image is missing or "
                 "cannot be read, instead of failing")
  p.set_defaults(func=lambda a: print(json.dumps(run(a))))
