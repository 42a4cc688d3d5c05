"""data.llm_client + data.synth against a real loopback HTTP server (tests/llm_server.py)."""
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data import llm_client as lc
from data import synth
from data.errors import BadSample
from data.jsonfile import JsonlStore
from llm_server import LLMServer, Reply, tag_of

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-SECRET-4711"

GOOD = ("User: What kind of scan is shown?\nAssistant: An axial CT slice of the chest.\n"
        "User: What stands out in the image?\nAssistant: A round opacity in the right lower lobe.\n"
        "User: Is it large?\nAssistant: It is moderate in size; a clinician should review it.")


def within_binomial(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
  return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_endpoint_parse():
  e = lc.Endpoint.parse("claude=http://127.0.0.1:9/v1/,claude-3-opus,0.25,MY_KEY")
  assert (e.name, e.base_url, e.model, e.weight, e.key_env) == ("claude", "http://127.0.0.1:9/v1", "claude-3-opus",
                                                               0.25, "MY_KEY")
  assert e.url == "http://127.0.0.1:9/v1/chat/completions"
  assert lc.Endpoint.parse("x=https://h/v1,m").weight == 1.0
  for bad in ("x=ftp://h,m,1", "x=http://h/v1", "http://h/v1,m,1", "x=http://h/v1,m,0", "x=http://h/v1,m,abc"):
    with pytest.raises(ValueError):
      lc.Endpoint.parse(bad)


def test_pick_follows_weights_and_is_reproducible():
  eps = [lc.Endpoint("a", "http://h/v1", "ma", 0.25), lc.Endpoint("b", "http://h/v1", "mb", 0.75)]
  keys = [f"row{i}" for i in range(4000)]
  pick = lambda seed, order: {k: c.pick(k).name for c in [lc.ChatClient(eps, seed=seed)] for k in order}
  picks = pick(3, keys)
  assert within_binomial(list(picks.values()).count("a"), len(keys), 0.25)
  assert picks == pick(3, keys[::-1])  # another client, another order: the same split
  assert picks != pick(4, keys)  # the seed matters


def test_client_retries_transient_failures_and_hides_key(monkeypatch, caplog):
  def reply(req, attempt):
    tag = tag_of(req)
    if tag == "e500" and attempt == 1:
      return Reply(status=500)
    if tag == "e429" and attempt < 3:
      return Reply(status=429, headers={"Retry-After": "0"})
    if tag == "slow" and attempt == 1:
      return Reply("late", delay=1.0)
    if tag == "garbage" and attempt == 1:
      return Reply(body=b"<html>proxy error " + KEY.encode() + b"</html>")
    if tag == "e400":
      return Reply(status=400)
    return Reply(f"answer for {tag}")

  monkeypatch.setenv("TEST_LLM_KEY", KEY)
  caplog.set_level(logging.WARNING)
  with LLMServer(reply) as srv:
    ep = lc.Endpoint.parse(f"s={srv.url},m1,1,TEST_LLM_KEY")
    client = lc.ChatClient([ep], timeout=0.3, max_retries=3, backoff=0.001)
    msg = lambda t: [{"role": "user", "content": f"[[{t}]]"}]
    for tag, attempts in (("ok", 1), ("e500", 2), ("e429", 3), ("slow", 2), ("garbage", 2)):
      res = client.chat(msg(tag), key=tag)
      assert (res.text, res.attempts) == (f"answer for {tag}", attempts), tag
    with pytest.raises(lc.LLMError) as ei:
      client.chat(msg("e400"), key="e400")
    assert ei.value.status == 400 and len(srv.requests_for("e400")) == 1  # 4xx other than 429: no retry
    assert {e["authorization"] for e in srv.log} == {f"Bearer {KEY}"}
  u = client.usage["s"]
  assert (u.requests, u.retries, u.failures) == (11, 5, 1)
  assert u.prompt_tokens == 11 * 5 and u.completion_tokens == 5 * 3
  assert "retry" in caplog.text and KEY not in caplog.text and KEY not in str(ei.value)


def test_jsonl_store_drops_torn_tail_and_keeps_last_row(tmp_path):
  path = tmp_path / "p.jsonl"
  with JsonlStore(path) as s:
    s.append({"id": "a", "v": 1})
    s.append({"id": "b", "v": 1})
  with open(path, "a") as f:
    f.write('{"id": "c", "v"')  # a write cut short by a kill
  s = JsonlStore(path)
  assert sorted(s.load()) == ["a", "b"]
  s.append({"id": "a", "v": 2})
  s.close()
  rows = s.load()
  assert rows["a"]["v"] == 2 and len(path.read_text().splitlines()) == 3
  path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
  with pytest.raises(BadSample, match="line 2"):
    JsonlStore(path).load()


def test_parse_conversation_and_validation():
  pairs = synth.parse_conversation("Here is the conversation:\n\n**User:** <image>\nWhat is shown?\n"
                                   "**Assistant:** A chest X-ray.\n\nUser: Any effusion?\nAssistant: Yes, on the right."
                                   "\nUser: And the heart?")
  assert pairs == [("What is shown?", "A chest X-ray."), ("Any effusion?", "Yes, on the right.")]
  cases = {"no turns at all": "unparseable",
           "User: a?\nAssistant: b.\nUser: c?\nUser: d?\nAssistant: e.": "malformed_turns",
           "User: a?\nAssistant: b.": "too_few_turns",
           "User: a?\nAssistant: As the caption says, b.\nUser: c?\nAssistant: d.": "forbidden_word",
           "User: a?\nAssistant: \nUser: c?\nAssistant: d.": "empty_answer"}
  for text, reason in cases.items():
    with pytest.raises(BadSample) as ei:
      synth.parse_conversation(text)
    assert ei.value.reason == reason, text


def test_prompts_render_table6_and_few_shot():
  ours, llava_med = synth.Prompt.load("llama3med"), synth.Prompt.load("llavamed")
  assert "Now, generate sample conversations based on these guidelines." in ours.system
  assert "Below are requirements for generating the questions and answers" in llava_med.system
  msgs = ours.messages("CT of the chest.", ["First mention ( Fig. 1 ) .", "Second ( Fig. 1 ) ."])
  assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * len(ours.few_shot) + ["user"]
  assert len(ours.few_shot) >= 2
  assert msgs[-1]["content"] == ("Figure Caption: CT of the chest.\n"
                                 "In Context Mentioning #1: First mention ( Fig. 1 ) .\n"
                                 "In Context Mentioning #2: Second ( Fig. 1 ) .")
  assert msgs[2]["content"].startswith("User: What is the location of the extraskelatal mass?\nAssistant: ")
  # every few-shot answer is itself a valid synthesized conversation
  for ex in ours.few_shot:
    assert len(synth.parse_conversation(ours.render_conversation(ex["conversations"]))) >= 2


def _figures(path: Path, n: int) -> list[str]:
  ids = [f"p{i:03d}" for i in range(n)]
  with open(path, "w") as f:
    for pid in ids:
      f.write(json.dumps({"pair_id": pid, "image": f"{pid}.jpg", "caption": f"[[{pid}]] Axial CT of the chest.",
                          "mentions": [f"CT showed an opacity ( Fig. 1 ) [{pid}] ."]}) + "\n")
  return ids


def _reply(req, attempt):
  """Canned behaviour by row number: malformed, forbidden words, too short, 500 / 429 first."""
  tag = tag_of(req)
  i = int(tag[1:])
  if i % 10 == 3:
    return Reply("I cannot help with that.")
  if i % 10 == 5:
    return Reply(GOOD.replace("An axial CT slice", "As the caption says, an axial CT slice"))
  if i % 10 == 7:
    return Reply("User: Only one?\nAssistant: Yes.")
  if i % 10 == 1 and attempt == 1:
    return Reply(status=500)
  if i % 10 == 9 and attempt == 1:
    return Reply(status=429, headers={"Retry-After": "0"})
  return Reply(GOOD)


EXPECTED_REJECT = {3: "unparseable", 5: "forbidden_word", 7: "too_few_turns"}


def test_synth_writes_llava_json_rejects_and_weighted_mix(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("TEST_LLM_KEY", KEY)
  ids = _figures(tmp_path / "figs.jsonl", 80)
  out = tmp_path / "out" / "synth.json"
  with LLMServer(_reply) as srv:
    rc = synth.main(["--figures", str(tmp_path / "figs.jsonl"), "--out", str(out), "--seed", "7",
                     "--endpoint", f"claude={srv.url},claude-3-opus,0.25,TEST_LLM_KEY",
                     "--endpoint", f"llama={srv.url},llama-3-70b,0.75,TEST_LLM_KEY",
                     "--concurrency", "4", "--backoff", "0.001"])
  assert rc == 0
  data = json.loads(out.read_text())
  expect_ok = [p for p in ids if int(p[1:]) % 10 not in EXPECTED_REJECT]
  assert [r["id"] for r in data] == expect_ok
  placements = set()
  for r in data:
    assert set(r) == {"id", "image", "conversations"} and r["image"] == f"{r['id']}.jpg"
    conv = r["conversations"]
    assert len(conv) == 6 and [t["from"] for t in conv] == ["human", "gpt"] * 3
    assert all(t["value"].strip() for t in conv)
    assert sum(t["value"].count("<image>") for t in conv) == 1
    first = conv[0]["value"]
    placements.add("before" if first.startswith("<image>\n") else "after" if first.endswith("\n<image>") else "?")
  assert placements == {"before", "after"}
  rejects = [json.loads(line) for line in synth.rejects_path(out).read_text().splitlines()]
  assert {r["id"]: r["reason"] for r in rejects} == {p: EXPECTED_REJECT[int(p[1:]) % 10] for p in ids
                                                     if int(p[1:]) % 10 in EXPECTED_REJECT}
  assert all(r["raw"] and r["detail"] for r in rejects)
  # the mix: each row went where the seeded split said, and the split follows the weights
  progress = {r["id"]: r for r in map(json.loads, synth.progress_path(out).read_text().splitlines())}
  assert sorted(progress) == ids
  served = {e["tag"]: e["model"] for e in srv.log if e["status"] == 200}
  assert all(served[p] == progress[p]["model"] for p in ids)
  assert sum(r["endpoint"] == "claude" for r in progress.values()) == \
      sum(lc.ChatClient([lc.Endpoint("claude", "http://x", "m", 0.25), lc.Endpoint("llama", "http://x", "m", 0.75)],
                        seed=7).pick(p).name == "claude" for p in ids)
  assert within_binomial(sum(r["endpoint"] == "claude" for r in progress.values()), len(ids), 0.25)
  assert all(r["completion_tokens"] > 0 for r in progress.values())
  printed = capsys.readouterr()
  assert "kept" in printed.err and "tokens out" in printed.err
  for text in (printed.out, printed.err, out.read_text(), synth.progress_path(out).read_text()):
    assert KEY not in text


def test_synth_resumes_after_kill(tmp_path):
  ids = _figures(tmp_path / "figs.jsonl", 30)
  out = tmp_path / "synth.json"
  prog = synth.progress_path(out)
  args = ["--figures", str(tmp_path / "figs.jsonl"), "--out", str(out), "--concurrency", "2", "--backoff", "0.001"]

  def slow(req, attempt):
    r = _reply(req, attempt)
    r.delay = 0.1
    return r

  with LLMServer(slow) as srv:
    ep = ["--endpoint", f"a={srv.url},m-a,1", "--endpoint", f"b={srv.url},m-b,1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "data.synth", *args, *ep], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline and (not prog.exists() or len(prog.read_text().splitlines()) < 6):
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = []
    for line in prog.read_text().splitlines():
      try:
        first.append(json.loads(line)["id"])
      except ValueError:  # the kill may have cut the last line short
        pass
    assert 6 <= len(first) < len(ids), "the job should have been killed part way"
    n_logged = len(srv.log)
    assert synth.main([*args, *ep]) == 0
    second = {e["tag"] for e in srv.log[n_logged:]}
  assert not second & set(first)  # nothing finished before the kill was asked again
  rows = [json.loads(line) for line in prog.read_text().splitlines()]
  assert sorted(r["id"] for r in rows) == ids  # every row exactly once: none lost, none duplicated
  assert [r["id"] for r in json.loads(out.read_text())] == [p for p in ids if int(p[1:]) % 10 not in EXPECTED_REJECT]


def test_synth_bad_input_names_the_line(tmp_path, capsys):
  path = tmp_path / "figs.jsonl"
  path.write_text('{"pair_id": "a", "image": "a.jpg", "caption": "x", "mentions": []}\n'
                  '{"pair_id": "b", "image": "b.jpg", "caption": "  ", "mentions": []}\n')
  with pytest.raises(SystemExit) as ei:
    synth.main(["--figures", str(path), "--out", str(tmp_path / "o.json"), "--endpoint", "a=http://127.0.0.1:9/v1,m"])
  assert ei.value.code == 2
  err = capsys.readouterr().err
  assert "no_caption" in err and "line 2" in err and "'b'" in err
  rows, skipped = synth.read_figures(str(path), lenient=True)
  assert [r["pair_id"] for r in rows] == ["a"] and skipped == {"no_caption": 1}
