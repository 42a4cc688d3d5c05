"""`python -m data.ldrt`: the LDRT figure-data pipeline (LDRT LLaVA-LoRA, arXiv 2501.15370, Sec. 3.1).

1. Figures as pdffigures2 writes them (one JSON per article: name, figType, caption, page, renderURL) are
   filtered: images smaller than --min-size px on a side, or whose variance of the Laplacian (grayscale,
   0-255) is below --blur-threshold, are dropped (the paper: 100 and 100).
2. Sentences of the article's markdown (Marker output, `<article>.md`) that cite the figure ("Fig. 2",
   "Figure 2A", "Figs. 2-3", "Table 1") become its context.
3. With --endpoint: an LLM writes a detailed description and a complex-reasoning QA per figure (same
   client, weighted split, retries and resume as `data.synth`); each description gets the most similar
   of the 20 template questions by TF-IDF cosine similarity (scikit-learn).
4. Articles are split train/eval (97/3 by default) with a seed.

Writes to --out-dir: figures.jsonl (kept figures, also valid `data.synth --figures` input), dropped.jsonl
(with reasons), generated.progress.jsonl (resume record), train.json and eval.json (LLaVA JSON), eval.jsonl (question,
answer, caption, context, category: what `evaluation.judge --rule ldrt` reads) and rejects.jsonl.
"""
from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from concurrent import futures
from pathlib import Path
from typing import Optional

import numpy as np

from data import llm_client as lc
from data import synth
from data.errors import BadSample, cli_errors
from data.jsonfile import JsonlStore, load_json, write_json, write_jsonl

log = logging.getLogger(__name__)

TEMPLATES_FILE = synth.PROMPTS_DIR / "ldrt_detail_questions.txt"
TASKS = ("detail", "complex")

# ---------------------------------------------------------------------------------------------- images


def laplacian_variance(gray: np.ndarray) -> float:
  """Variance of the 4-neighbour Laplacian of a 0-255 grayscale image (OpenCV's Laplacian, ksize 1)."""
  from skimage.filters import laplace
  return float(laplace(np.asarray(gray, dtype=np.float64)).var())


def check_image(path: str, min_size: int, blur_threshold: float) -> dict:
  """Size and sharpness of one image; `reason` says why it is dropped (None: kept)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      w, h = im.size
      if min(w, h) < min_size:
        return {"width": w, "height": h, "reason": "too_small"}
      gray = np.asarray(im.convert("L"))
  except FileNotFoundError:
    return {"reason": "missing_image"}
  except Exception as e:  # PIL raises many types for bad files
    return {"reason": "corrupt_image", "detail": f"{type(e).__name__}: {e}"}
  var = laplacian_variance(gray)
  return {"width": w, "height": h, "laplacian_var": round(var, 3),
          "reason": "blurry" if var < blur_threshold else None}


# -------------------------------------------------------------------------------------------- mentions

_ITEM = r"S?\d+[a-z]?(?:[-\u2013\u2014][a-z](?![a-z]))?"
_REF = re.compile(rf"\b(fig(?:ure)?s?|tab(?:le)?s?)\.?\s*({_ITEM}(?:\s*(?:[-\u2013\u2014,&]|and|to)\s*{_ITEM})*)",
                  re.I)
_NUM = re.compile(r"(S?)(\d+)[a-z]?(?:[-\u2013\u2014][a-z](?![a-z]))?|([-\u2013\u2014]|\bto\b)", re.I)
_ABBREV = {"fig", "figs", "e.g", "i.e", "al", "vs", "approx", "ca", "cf", "dr", "no", "nos", "ref", "refs",
           "eq", "eqs", "sec", "suppl", "tab", "resp", "mr", "ms", "st", "vol", "pp"}
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z])")
_CAPTION_PARA = re.compile(r"^\W*(?:fig(?:ure)?|tab(?:le)?)\.?\s*S?\d+[a-z]?\s*[.:|]", re.I)


def find_references(sentence: str) -> set[tuple[str, str]]:
  """{(figType, name)} cited in a sentence: 'Figs. 2-3' -> Figure 2, Figure 3; 'Figure 2A' -> Figure 2."""
  refs = set()
  for m in _REF.finditer(sentence):
    kind = "Figure" if m.group(1)[0] in "fF" else "Table"
    prev, ranged = None, False
    for t in _NUM.finditer(m.group(2)):
      if t.group(3):
        ranged = True
        continue
      prefix, n = t.group(1).upper(), int(t.group(2))
      lo = prev[1] + 1 if ranged and prev and prev[0] == prefix and 0 < n - prev[1] <= 50 else n
      refs.update((kind, f"{prefix}{k}") for k in range(lo, n + 1))
      prev, ranged = (prefix, n), False
  return refs


def split_sentences(text: str) -> list[str]:
  """Sentences, not cut after 'Fig.', 'e.g.', 'et al.' or initials."""
  out, start = [], 0
  for m in _BOUNDARY.finditer(text):
    if text[m.start()] == ".":
      word = re.search(r"([\w.]+)$", text[start:m.start()])
      if word and (word.group(1).lower() in _ABBREV or (len(word.group(1)) == 1 and word.group(1).isalpha())):
        continue
    out.append(text[start:m.end()].strip())
    start = m.end()
  out.append(text[start:].strip())
  return [s for s in out if s]


def markdown_paragraphs(md: str) -> list[str]:
  """Running text of a Marker markdown file: no headings, tables, images, code, captions; links as text."""
  md = re.sub(r"!\[[^\]]*\]\([^)]*\)", " ", md)
  md = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", md)
  md = re.sub(r"<[^>]+>|\*\*|__|\*", "", md)
  paras = []
  for block in re.split(r"\n\s*\n", md):
    lines = [ln.strip() for ln in block.strip().splitlines()]
    if not lines or lines[0].startswith(("#", "|", "```")):
      continue
    para = " ".join(ln.lstrip("-+> ").strip() for ln in lines)
    if para and not _CAPTION_PARA.match(para):
      paras.append(para)
  return paras


def mentions_by_figure(md: str) -> dict[tuple[str, str], list[str]]:
  out: dict[tuple[str, str], list[str]] = {}
  for para in markdown_paragraphs(md):
    for sent in split_sentences(para):
      for ref in sorted(find_references(sent)):
        lst = out.setdefault(ref, [])
        if sent not in lst:
          lst.append(sent)
  return out


# ------------------------------------------------------------------------------------------- templates


def load_templates(path: Path = TEMPLATES_FILE) -> list[str]:
  lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
  return [ln for ln in lines if ln and not ln.startswith("#")]


class TemplateMatcher:
  """Most similar template question for a description: TF-IDF fitted on the templates alone, so a
  description's match does not depend on which other descriptions are in the batch."""

  def __init__(self, templates: list[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer
    self.templates = templates
    self.vectorizer = TfidfVectorizer(stop_words="english").fit(templates)
    self._t = self.vectorizer.transform(templates)

  def match(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(template index, cosine similarity) per text; similarity 0 means no shared term."""
    if not texts:
      return np.zeros(0, int), np.zeros(0)
    sims = (self.vectorizer.transform(texts) @ self._t.T).toarray()
    idx = sims.argmax(1)
    return idx, sims[np.arange(len(texts)), idx]


# ------------------------------------------------------------------------------------------------ scan


def split_articles(articles: list[str], eval_frac: float, seed: int) -> set[str]:
  """Articles held out for evaluation (at least one once there are two or more)."""
  arts = sorted(set(articles))
  random.Random(seed).shuffle(arts)
  n = round(eval_frac * len(arts))
  if eval_frac > 0 and len(arts) > 1:
    n = min(max(n, 1), len(arts) - 1)
  return set(arts[:n])


def _find_markdown(markdown_dir: Optional[Path], article: str) -> Optional[Path]:
  if markdown_dir is None:
    return None
  for p in (markdown_dir / f"{article}.md", markdown_dir / article / f"{article}.md"):
    if p.is_file():
      return p
  return None


def _resolve_image(render_url: str, root: Path, fig_id: str) -> Path:
  """The figure's image, which must lie inside `root`: a relative renderURL is taken under root; an
  absolute one as given, else by its file name under root (pdffigures2 output that was moved)."""
  given = Path(render_url)
  tries = [given, root / given.name] if given.is_absolute() else [root / given]
  inside = [c for c in (t.resolve() for t in tries) if c.is_relative_to(root)]
  if not inside:
    raise BadSample("path_escape", f"image {render_url!r} is outside the image root {root}", sample_id=fig_id)
  return next((c for c in inside if c.is_file()), inside[-1])


def scan(figures_dir: Path, markdown_dir: Optional[Path], image_root: Path, *, min_size: int = 100,
         blur_threshold: float = 100.0, types=("Figure", "Table"), max_mentions: int = 10, workers: int = 1,
         lenient: bool = False) -> tuple[list[dict], list[dict], dict]:
  """(kept figures, dropped figures, counts) for every pdffigures2 JSON in `figures_dir`."""
  root = image_root.resolve()
  cands, dropped, counts = [], [], {"articles": 0, "articles without markdown": 0, "figures": 0}
  for jpath in sorted(figures_dir.glob("*.json")):
    article = jpath.stem
    try:
      figs = load_json(jpath)
      figs = figs.get("figures", []) if isinstance(figs, dict) else figs
      if not isinstance(figs, list):
        raise BadSample("malformed_json", "expected a list of figures", path=str(jpath))
    except BadSample as e:
      if not lenient:
        raise
      counts["skipped bad figure files"] = counts.get("skipped bad figure files", 0) + 1
      log.warning("skipped: %s", e)
      continue
    counts["articles"] += 1
    md_path = _find_markdown(markdown_dir, article)
    if md_path is None:
      counts["articles without markdown"] += 1
    mentions = mentions_by_figure(md_path.read_text(encoding="utf-8", errors="replace")) if md_path else {}
    for fig in figs:
      counts["figures"] += 1
      try:
        if not isinstance(fig, dict) or not all(k in fig for k in ("name", "figType", "caption", "renderURL")):
          raise BadSample("bad_figure", "needs name, figType, caption, renderURL", path=str(jpath))
        kind, name = str(fig["figType"]), str(fig["name"]).strip().upper()
        fig_id = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{article}_{kind}{name}")
        row = {"pair_id": fig_id, "article": article, "fig_type": kind, "fig_name": name,
               "page": fig.get("page"), "caption": str(fig["caption"]).strip(),
               "mentions": mentions.get((kind, name), [])[:max_mentions]}
        if kind not in types:
          raise BadSample("type_excluded", f"figType {kind!r} not in {list(types)}", sample_id=fig_id)
        if not row["caption"]:
          raise BadSample("no_caption", "empty caption", sample_id=fig_id)
        path = _resolve_image(str(fig["renderURL"]), root, fig_id)
        row["image"] = path.relative_to(root).as_posix()
        cands.append((row, str(path)))
      except BadSample as e:
        if e.reason == "bad_figure" and not lenient:
          raise
        dropped.append({"pair_id": e.sample_id, "article": article, "reason": e.reason, "detail": str(e)})
  check = [(p, min_size, blur_threshold) for _, p in cands]
  if workers > 1 and len(check) > 1:
    with futures.ProcessPoolExecutor(workers) as pool:
      stats = list(pool.map(check_image, *zip(*check), chunksize=16))
  else:
    stats = [check_image(*c) for c in check]
  kept = []
  for (row, _), st in zip(cands, stats):
    reason = st.pop("reason")
    if reason:
      dropped.append({"pair_id": row["pair_id"], "article": row["article"], "image": row["image"],
                      "reason": reason, **st})
    else:
      kept.append({**row, **st})
  counts["kept"] = len(kept)
  for d in dropped:
    counts[f"dropped: {d['reason']}"] = counts.get(f"dropped: {d['reason']}", 0) + 1
  counts["kept with mentions"] = sum(bool(r["mentions"]) for r in kept)
  return kept, dropped, counts


# ------------------------------------------------------------------------------------------ generation

_QA = re.compile(r"^[\s*_#>-]*question[\s*_]*:[\s*_]*(?P<q>.+?)\n[\s*_#>-]*answer[\s*_]*:[\s*_]*(?P<a>.+)\Z",
                 re.I | re.S)


def parse_qa(text: str) -> tuple[str, str]:
  m = _QA.match(text.strip())
  if not m:
    raise BadSample("unparseable", "reply is not 'Question: ...' then 'Answer: ...'")
  q, a = m.group("q").strip(), m.group("a").strip()
  if not q:
    raise BadSample("empty_question", "the question is empty")
  return q, a


def generate(figures: list[dict], client: lc.ChatClient, prompts: dict, store: JsonlStore, *,
             concurrency: int, limit: Optional[int] = None) -> dict:
  """A detailed description and a complex-reasoning QA per figure; finished rows go to `store`."""
  done = store.load()
  todo = [(f, t) for f in figures for t in TASKS if f"{f['pair_id']}:{t}" not in done][:limit]
  counts = {"already done": len(done), "requested": len(todo), "ok": 0, "rejected": 0, "request failed": 0}

  def work(item):
    fig, task = item
    return client.chat(prompts[task].messages(fig["caption"], fig["mentions"]), key=f"{fig['pair_id']}:{task}")

  def parse(task, text):
    q, a = parse_qa(text) if task == "complex" else (None, text.strip())
    synth.check_text([a] + ([q] if q else []))
    return {"question": q, "answer": a}

  def on_done(item, res, err):
    fig, task = item
    lc.settle(f"{fig['pair_id']}:{task}", res, err, counts, store,
              lambda text: parse(task, text), pair_id=fig["pair_id"], task=task)

  lc.run_pool(todo, work, on_done, concurrency=concurrency, description="generating")
  return counts


def finalize(figures: list[dict], store: JsonlStore, out_dir: Path, matcher: TemplateMatcher, *,
             eval_frac: float, seed: int) -> dict:
  """train.json, eval.json, eval.jsonl and rejects.jsonl from the progress file; totals over all
  runs. eval.json is the held-out split as LLaVA conversations (the trainer's held-out loss),
  eval.jsonl the same rows for `vqa run` and the judge."""
  done = store.load()
  rows = [(f, done[f"{f['pair_id']}:{t}"]) for f in figures for t in TASKS if f"{f['pair_id']}:{t}" in done]
  ok = [(f, r) for f, r in rows if r["status"] == "ok"]
  detail = [r for _, r in ok if r["task"] == "detail"]
  idx, sim = matcher.match([r["answer"] for r in detail])
  fallback = 0
  for r, i, s in zip(detail, idx, sim):
    if s <= 0:  # no shared term with any template: pick one at random (seeded per row)
      i, fallback = synth.row_rng(seed, "template", r["id"]).randrange(len(matcher.templates)), fallback + 1
    r["question"] = matcher.templates[i]
  held_out = split_articles([f["article"] for f, _ in ok], eval_frac, seed)
  train, eval_conv, evals = [], [], []
  for f, r in ok:
    sid = f"{f['pair_id']}_{r['task']}"
    conv = synth.to_llava(sid, f["image"], [(r["question"], r["answer"])], synth.row_rng(seed, "image", sid))
    if f["article"] in held_out:
      eval_conv.append(conv)
      evals.append({"question_id": sid, "image": f["image"], "question": r["question"], "answer": r["answer"],
                    "caption": f["caption"], "context": f["mentions"], "category": r["task"],
                    "article": f["article"]})
    else:
      train.append(conv)
  rejects = [{k: r.get(k) for k in ("id", "reason", "detail", "endpoint", "raw")} for _, r in rows
             if r["status"] != "ok"]
  write_json(out_dir / "train.json", train)
  write_json(out_dir / "eval.json", eval_conv)
  write_jsonl(out_dir / "eval.jsonl", evals)
  write_jsonl(out_dir / "rejects.jsonl", rejects)
  totals = {"generated ok": len(ok), "rejected": len(rejects),
            "pending": len(figures) * len(TASKS) - len(rows), "template by random fallback": fallback,
            "train samples": len(train), "eval samples": len(evals), "eval articles": len(held_out)}
  for r in rejects:
    totals[f"rejected: {r['reason']}"] = totals.get(f"rejected: {r['reason']}", 0) + 1
  return totals


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m data.ldrt", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--figures-dir", type=Path, required=True, help="pdffigures2 JSON files, one per article")
  p.add_argument("--markdown-dir", type=Path, help="article markdown: <article>.md or <article>/<article>.md")
  p.add_argument("--image-root", type=Path, help="folder holding the rendered figures; image paths must stay "
                 "inside it (default: --figures-dir)")
  p.add_argument("--out-dir", type=Path, required=True)
  p.add_argument("--min-size", type=int, default=100, help="drop images narrower or shorter than this (px)")
  p.add_argument("--blur-threshold", type=float, default=100.0,
                 help="drop images whose variance of the Laplacian (grayscale 0-255) is below this")
  p.add_argument("--types", default="Figure,Table", help="pdffigures2 figTypes to keep")
  p.add_argument("--max-mentions", type=int, default=10, help="most citing sentences kept per figure")
  p.add_argument("--workers", type=int, default=1, help="processes for the image checks")
  synth.add_endpoint_args(p)
  p.add_argument("--detail-prompt", default="ldrt_detail", help="prompt name in data/prompts or a JSON path")
  p.add_argument("--complex-prompt", default="ldrt_complex", help="prompt name in data/prompts or a JSON path")
  p.add_argument("--templates", type=Path, default=TEMPLATES_FILE, help="template questions, one a line")
  p.add_argument("--eval-frac", type=float, default=0.03, help="share of articles held out for evaluation")
  p.add_argument("--seed", type=int, default=0, help="seeds the split, endpoint choice, <image> placement")
  p.add_argument("--lenient", action="store_true", help="skip (and count) malformed figure files")
  lc.add_client_args(p, temperature=0.7, max_tokens=1024)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  endpoints = synth.parse_endpoints(p, args.endpoint)
  with cli_errors():
    return run(args, endpoints)


def run(args, endpoints) -> int:
  """The command line's work: filter, then generate when endpoints are given; the exit status."""
  con = lc.console()
  kept, dropped, counts = scan(args.figures_dir, args.markdown_dir, args.image_root or args.figures_dir,
                               min_size=args.min_size, blur_threshold=args.blur_threshold,
                               types=tuple(args.types.split(",")), max_mentions=args.max_mentions,
                               workers=args.workers, lenient=args.lenient)
  write_jsonl(args.out_dir / "figures.jsonl", kept)
  write_jsonl(args.out_dir / "dropped.jsonl", dropped)
  con.print(lc.counts_table("figures", counts))
  if not endpoints:
    con.print("no --endpoint: filtered figures written, nothing generated")
    return 0
  client = lc.client_from_args(args, endpoints, seed=args.seed)
  prompts = {"detail": synth.Prompt.load(args.detail_prompt), "complex": synth.Prompt.load(args.complex_prompt)}
  matcher = TemplateMatcher(load_templates(args.templates))
  with JsonlStore(args.out_dir / "generated.progress.jsonl") as store:
    asked = generate(kept, client, prompts, store, concurrency=args.concurrency, limit=args.limit)
    totals = finalize(kept, store, args.out_dir, matcher, eval_frac=args.eval_frac, seed=args.seed)
  con.print(lc.counts_table("this run", asked))
  con.print(lc.counts_table(f"{args.out_dir} (all runs)", totals))
  return lc.finish(con, client, asked)


if __name__ == "__main__":
  sys.exit(main())
