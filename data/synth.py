"""`python -m data.synth`: multi-turn biomedical QA synthesized from figure captions and in-text mentions
by several LLMs (Llama3-Med Sec. 3 and Table 6: 25% Claude3-Opus, 75% LLaMA3-70B), written as LLaVA JSON.

Input: JSONL rows `{"pair_id", "image", "caption", "mentions": [...]}` (what `data.ldrt` writes as
figures.jsonl too). Every row goes to one endpoint chosen by weight with a seeded RNG; the reply is parsed
into User/Assistant turns, validated, and given `<image>` before or after the first question (seeded).
Progress is an append-only JSONL next to the output, so a rerun skips rows already answered; requests that
failed after all retries are not recorded and are tried again by the next run.

  OUT.json                LLaVA JSON list [{"id", "image", "conversations"}] in input order
  OUT.rejects.jsonl       rows whose reply failed validation, with `reason` and the raw reply
  OUT.progress.jsonl      every finished row (the resume record, with endpoint and token counts)

Example (the paper's mix; keys come from the named environment variables):
  python -m data.synth --figures figs.jsonl --out synth_20k.json --concurrency 16 \\
    --endpoint claude=https://llm-gateway.example/v1,claude-3-opus,0.25,GATEWAY_KEY \\
    --endpoint llama=http://gpu-node:8000/v1,meta-llama/Meta-Llama-3-70B-Instruct,0.75,VLLM_KEY
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import re
import sys
from pathlib import Path
from typing import Optional

from data import llm_client as lc
from data.errors import BadSample, cli_errors
from data.jsonfile import JsonlStore, iter_jsonl, load_json, write_json, write_jsonl

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
PROMPTS = {"llama3med": "synth_llama3med.json", "llavamed": "synth_llavamed.json"}
FORBIDDEN = ("caption", "mentioned", "context")
_TURN = re.compile(r"^[ \t>*_#-]*(user|assistant)[ \t*_]*:[ \t*_]*", re.I | re.M)


@dataclasses.dataclass
class Prompt:
  """A system prompt plus how captions, mentions and few-shot conversations are laid out as text."""
  system: str
  caption: str = "Figure Caption:\n{caption}"
  mentions_header: str = ""
  mention: str = "\n\t- {text}"
  user_turn: str = "User: {text}"
  assistant_turn: str = "Assistant: {text}"
  turn_sep: str = "\n\n"
  few_shot: list = dataclasses.field(default_factory=list)

  @classmethod
  def load(cls, name_or_path: str) -> "Prompt":
    """A name from PROMPTS / a file in data/prompts, or a path to a prompt JSON file."""
    path = lc.find_named_file(name_or_path, PROMPTS_DIR, PROMPTS, "prompt")
    spec = {k: v for k, v in load_json(path).items() if not k.startswith("_")}
    shots = spec.pop("few_shot", None)
    prompt = cls(**spec)
    if shots:
      prompt.few_shot = [row for _, row in iter_jsonl(path.parent / shots)]
    return prompt

  def context(self, caption: str, mentions: list[str]) -> str:
    text = self.caption.format(caption=caption.strip())
    if mentions:
      text += self.mentions_header + "".join(self.mention.format(n=i, text=m.strip())
                                             for i, m in enumerate(mentions, 1))
    return text

  def render_conversation(self, conversations: list[dict]) -> str:
    return self.turn_sep.join((self.user_turn if t["from"] == "human" else self.assistant_turn).format(
        text=t["value"]) for t in conversations)

  def messages(self, caption: str, mentions: list[str]) -> list[dict]:
    msgs = [{"role": "system", "content": self.system}]
    for ex in self.few_shot:
      msgs += [{"role": "user", "content": self.context(ex["caption"], ex.get("mentions", []))},
               {"role": "assistant", "content": self.render_conversation(ex["conversations"])}]
    return msgs + [{"role": "user", "content": self.context(caption, mentions)}]


def check_text(texts: list[str], forbidden=FORBIDDEN) -> None:
  """Reject text that gives away that it was written from the caption rather than the image."""
  for t in texts:
    if not t.strip():
      raise BadSample("empty_answer", "an answer is empty")
    low = t.lower()
    for word in forbidden:
      if word in low:
        raise BadSample("forbidden_word", f"uses {word!r}: {t[:80]!r}")


def parse_conversation(text: str, *, min_turns: int = 2, forbidden=FORBIDDEN) -> list[tuple[str, str]]:
  """`User: ... Assistant: ...` turns (markdown bold and a preamble tolerated) -> validated QA pairs."""
  marks = list(_TURN.finditer(text))
  if not marks:
    raise BadSample("unparseable", "no 'User:' / 'Assistant:' turns in the reply")
  turns = [(m.group(1).lower(), text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))])
           for i, m in enumerate(marks)]
  turns = [(role, body.replace("<image>", "").strip()) for role, body in turns]
  if turns[-1][0] == "user":  # a trailing question without an answer is dropped, as LLaVA-Med does
    turns.pop()
  roles = [r for r, _ in turns]
  if roles != ["user", "assistant"] * (len(roles) // 2):
    raise BadSample("malformed_turns", f"turns do not alternate User/Assistant: {' '.join(roles)[:80]}")
  pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
  if any(not q for q, _ in pairs):
    raise BadSample("empty_question", "a question is empty")
  check_text([t for qa in pairs for t in qa], forbidden)
  if len(pairs) < min_turns:
    raise BadSample("too_few_turns", f"{len(pairs)} QA turn(s), need at least {min_turns}")
  return pairs


def place_image(question: str, rng: random.Random) -> str:
  """`<image>` before or after the first question at random, as LLaVA-Med's post-processing does."""
  return f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"


def to_llava(sample_id: str, image: str, pairs: list[tuple[str, str]], rng: random.Random) -> dict:
  conv = []
  for i, (q, a) in enumerate(pairs):
    conv += [{"from": "human", "value": place_image(q, rng) if i == 0 else q}, {"from": "gpt", "value": a}]
  return {"id": sample_id, "image": image, "conversations": conv}


def row_rng(seed: int, what: str, sample_id: str) -> random.Random:
  """A RNG per (seed, purpose, row) so results do not depend on order, concurrency or resumption."""
  return random.Random(f"{seed}\0{what}\0{sample_id}")


def read_figures(path: str, *, lenient: bool = False) -> tuple[list[dict], dict]:
  """Figure rows with a unique `pair_id`, a non-empty `caption`, an `image` and a list of `mentions`."""
  rows, skipped, seen = [], {}, set()
  for n, row in iter_jsonl(path):
    try:
      pid = row.get("pair_id")
      if not isinstance(pid, str) or not pid:
        raise BadSample("bad_row", f"line {n}: 'pair_id' must be a non-empty string", path=path)
      if pid in seen:
        raise BadSample("duplicate_id", f"line {n}: pair_id seen before", sample_id=pid, path=path)
      if not isinstance(row.get("caption"), str) or not row["caption"].strip():
        raise BadSample("no_caption", f"line {n}: empty or missing 'caption'", sample_id=pid, path=path)
      if not isinstance(row.get("image"), str) or not row["image"]:
        raise BadSample("bad_row", f"line {n}: missing 'image'", sample_id=pid, path=path)
      mentions = row.get("mentions") or []
      if not isinstance(mentions, list) or not all(isinstance(m, str) for m in mentions):
        raise BadSample("bad_row", f"line {n}: 'mentions' must be a list of strings", sample_id=pid, path=path)
    except BadSample as e:
      if not lenient:
        raise
      log.warning("skipped: %s", e)
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
      continue
    seen.add(pid)
    rows.append({**row, "mentions": mentions})
  return rows, skipped


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL,MODEL,WEIGHT[,KEY_ENV]",
                 help="an OpenAI-compatible server (repeat for several; requests split by WEIGHT). URL is the "
                      "base ending before /chat/completions, e.g. http://host:8000/v1. The API key is read "
                      f"from the environment variable KEY_ENV (default {lc.DEFAULT_KEY_ENV}; unset: no key)")


def parse_endpoints(p: argparse.ArgumentParser, specs: list[str]) -> list[lc.Endpoint]:
  try:
    return [lc.Endpoint.parse(s) for s in specs]
  except ValueError as e:
    p.error(str(e))


def synthesize(figures: list[dict], client: lc.ChatClient, prompt: Prompt, store: JsonlStore, *,
               seed: int, concurrency: int, limit: Optional[int] = None, min_turns: int = 2) -> dict:
  """Ask for every row not yet in `store`; append each finished row. Returns counts for this run."""
  done = store.load()
  todo = [f for f in figures if f["pair_id"] not in done][:limit]
  counts = {"already done": len(done), "requested": len(todo), "ok": 0, "rejected": 0, "request failed": 0}

  def work(fig):
    return client.chat(prompt.messages(fig["caption"], fig["mentions"]), key=fig["pair_id"])

  def parse(fig, text):
    pairs = parse_conversation(text, min_turns=min_turns)
    pid = fig["pair_id"]
    return {"record": to_llava(pid, fig["image"], pairs, row_rng(seed, "image", pid))}

  def on_done(fig, res, err):
    lc.settle(fig["pair_id"], res, err, counts, store, lambda text: parse(fig, text))

  lc.run_pool(todo, work, on_done, concurrency=concurrency, description="synthesizing")
  return counts


def finalize(figures: list[dict], store: JsonlStore, out: Path) -> dict:
  """Rewrite OUT.json and OUT.rejects.jsonl from the progress file; return totals over all runs."""
  done = store.load()
  order = [f["pair_id"] for f in figures if f["pair_id"] in done]
  kept = [done[i]["record"] for i in order if done[i]["status"] == "ok"]
  rejects = [{k: done[i].get(k) for k in ("id", "reason", "detail", "endpoint", "raw")}
             for i in order if done[i]["status"] != "ok"]
  write_json(out, kept)
  write_jsonl(rejects_path(out), rejects)
  totals = {"figures": len(figures), "kept": len(kept), "rejected": len(rejects),
            "pending": len(figures) - len(order)}
  for r in rejects:
    totals[f"rejected: {r['reason']}"] = totals.get(f"rejected: {r['reason']}", 0) + 1
  for i in order:
    key = f"endpoint {done[i]['endpoint']}"
    totals[key] = totals.get(key, 0) + 1
  return totals


def progress_path(out: Path) -> Path:
  return out.with_name(out.stem + ".progress.jsonl")


def rejects_path(out: Path) -> Path:
  return out.with_name(out.stem + ".rejects.jsonl")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--figures", required=True, help="input JSONL: pair_id, image, caption, mentions")
  p.add_argument("--out", required=True, type=Path, help="output LLaVA JSON file")
  add_endpoint_args(p)
  p.add_argument("--prompt", default="llama3med",
                 help=f"prompt: {' | '.join(PROMPTS)} (Llama3-Med Table 6) or a prompt JSON path")
  p.add_argument("--seed", type=int, default=0, help="seeds the endpoint split and the <image> placement")
  p.add_argument("--min-turns", type=int, default=2, help="fewest QA turns a conversation may have")
  p.add_argument("--lenient", action="store_true", help="skip (and count) bad input rows instead of stopping")
  lc.add_client_args(p, temperature=0.7, max_tokens=1024)
  args = p.parse_args(argv)
  if not args.endpoint:
    p.error("give at least one --endpoint")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  endpoints = parse_endpoints(p, args.endpoint)
  with cli_errors():
    figures, skipped = read_figures(args.figures, lenient=args.lenient)
    prompt = Prompt.load(args.prompt)
    client = lc.client_from_args(args, endpoints, seed=args.seed)
    with JsonlStore(progress_path(args.out)) as store:
      run = synthesize(figures, client, prompt, store, seed=args.seed, concurrency=args.concurrency,
                       limit=args.limit, min_turns=args.min_turns)
      totals = finalize(figures, store, args.out)
    con = lc.console()
    con.print(lc.counts_table("this run", {**run, **{f"skipped input: {k}": v for k, v in skipped.items()}}))
    con.print(lc.counts_table(f"{args.out} (all runs)", totals))
    return lc.finish(con, client, run)


if __name__ == "__main__":
  sys.exit(main())
