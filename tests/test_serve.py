"""`python -m serve`: the OpenAI-compatible server answers what a plain greedy loop answers for the
same prompt (tests/greedy.py; plain, streamed, sharing the engine's steps with other clients,
through the `openai` package, for evaluation.judge and data.synth), and turns bad requests into
4xx errors while it keeps serving."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import numpy as np
import pytest
from PIL import Image

from data.image import load_image
from data.conversation import stop_token_ids
from serve.engine import Engine
from serve.prompt import build_prompt
from serve.sampling import SamplingParams
from serve.server import create_app
from tests.greedy import greedy_tokens, loaded
from tests.serve_fixture import DICOM, LIMITS, MAX_NEW, MODEL, ROWS, Running, shared_server

Q = "What is shown in the image?"


@pytest.fixture(scope="module")
def srv():
  return shared_server()


def expected(srv, question, images=(), *, history=(), system=None, max_tokens=MAX_NEW, stop=(),
             ignore_eos=False):
  """The independent oracle's answer (tests/greedy.py: full forwards, argmax) for the prompt the
  request describes, cut at the first stop string as OpenAI does, and the prompt length."""
  gen = srv.gen
  prompt = build_prompt(gen.config, gen.tokenizer, question, list(images), system=system,
                        history=history)
  stops = () if ignore_eos else stop_token_ids(gen.tokenizer, gen.config.template)
  from tests.tiny_ckpt import shared_llava_checkpoint
  model, params, _ = loaded(shared_llava_checkpoint())   # stacked, as saved: not the engine's
  tokens = greedy_tokens(model, params, prompt, max_tokens, stops)
  text = gen.tokenizer.decode(tokens, skip_special_tokens=True)
  reason = "stop" if len(tokens) < max_tokens else "length"
  cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
  if cut >= 0:
    text, reason = text[:cut], "stop"
  return types.SimpleNamespace(text=text.strip(), tokens=tokens, finish_reason=reason), \
      len(prompt.ids)


def data_uri(raw: bytes, mime="image/png") -> str:
  return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def png_bytes(h=50, w=70, seed=0) -> bytes:
  """Random pixels; seed None: black (a large image in a small file)."""
  buf = io.BytesIO()
  px = (np.zeros((h, w, 3), np.uint8) if seed is None else
        np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
  Image.fromarray(px).save(buf, format="PNG")
  return buf.getvalue()


def user(text, *urls):
  return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}}
                                         for u in urls), {"type": "text", "text": text}]}


def ask(srv, messages, **kw):
  body = {"model": MODEL, "messages": messages, "temperature": 0, **kw}
  return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)


def sse(response) -> list:
  """The data: payloads of a server-sent event stream, [DONE] included."""
  out = []
  for line in response.iter_lines():
    if line.startswith("data: "):
      out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
  return out


def test_answers_equal_the_generators(srv):
  png = png_bytes()
  slide = load_image(os.path.join(srv.image_root, "slide.png"))
  cases = {"png data URI": ([data_uri(png)], [load_image(png)]),
           "DICOM data URI": ([data_uri(open(DICOM, "rb").read(), "application/dicom")],
                              [load_image(DICOM)]),
           "path under the root": (["ct.dcm"], [load_image(DICOM)]),
           "file:// URL under the root": ([f"file://{srv.image_root}/slide.png"], [slide]),
           "text only": ([], [])}
  for name, (urls, images) in cases.items():
    r = ask(srv, [user(Q, *urls)], max_tokens=MAX_NEW)
    assert r.status_code == 200, (name, r.text)
    want, n_prompt = expected(srv, Q, images)
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"]["content"] == want.text, name
    assert choice["message"]["role"] == "assistant" and choice["logprobs"] is None
    assert choice["finish_reason"] == want.finish_reason
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(want.tokens),
                             "total_tokens": n_prompt + len(want.tokens)}
  # vLLM's ignore_eos: no stop token ends the answer (what the benchmark uses)
  r = ask(srv, [user(Q, "slide.png")], ignore_eos=True).json()
  free, _ = expected(srv, Q, [slide], ignore_eos=True)
  assert r["choices"][0]["message"]["content"] == free.text
  assert r["usage"]["completion_tokens"] == MAX_NEW == len(free.tokens)


def test_streaming_concatenates_to_the_same_text(srv):
  msgs = [user(Q, "slide.png")]
  plain = ask(srv, msgs).json()["choices"][0]
  body = {"model": MODEL, "messages": msgs, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}}
  with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
  assert events[-1] == "[DONE]"
  chunks = [e for e in events[:-1] if e["choices"]]
  assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
  assert len([d for d in deltas if d]) > 1 and "".join(deltas) == plain["message"]["content"]
  assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
  assert all(c["object"] == "chat.completion.chunk" for c in chunks)
  usage = events[-2]["usage"]
  assert usage["completion_tokens"] > 0 and not events[-2]["choices"]


def test_multi_turn_system_and_stop(srv):
  img = load_image(os.path.join(srv.image_root, "slide.png"))
  first, _ = expected(srv, "Describe it.", [img])
  msgs = [{"role": "system", "content": "You read slides."}, user("Describe it.", "slide.png"),
          {"role": "assistant", "content": first.text}, user("Any tumour?")]
  want, _ = expected(srv, "Any tumour?", [img], history=[("Describe it.", first.text)],
                     system="You read slides.")
  got = ask(srv, msgs).json()["choices"][0]["message"]["content"]
  assert got == want.text
  word = want.text[len(want.text) // 2:len(want.text) // 2 + 2]
  assert word.strip(), want.text
  cut, _ = expected(srv, "Any tumour?", [img], history=[("Describe it.", first.text)],
                    system="You read slides.", stop=[word])
  r = ask(srv, msgs, stop=word).json()["choices"][0]
  assert r["message"]["content"] == cut.text == want.text[:want.text.index(word)].strip()
  assert r["finish_reason"] == "stop"


def test_concurrent_clients_get_their_own_answers_in_shared_steps(srv):
  questions = [f"Where is spot {i}?" for i in range(ROWS)]   # short: one prompt-length bucket
  img = load_image(os.path.join(srv.image_root, "slide.png"))
  want = [expected(srv, q, [img] if i % 3 else [])[0].text for i, q in enumerate(questions)]
  before = srv.get("/health")
  got, start = [None] * len(questions), threading.Barrier(len(questions))

  def client(i):
    msgs = [user(questions[i], *(["slide.png"] if i % 3 else []))]
    start.wait()
    if i % 2:   # half of them stream
      body = {"model": MODEL, "messages": msgs, "temperature": 0, "stream": True}
      with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
        got[i] = "".join(e["choices"][0]["delta"].get("content", "")
                         for e in sse(r)[:-1] if e["choices"])
    else:
      got[i] = ask(srv, msgs).json()["choices"][0]["message"]["content"]

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert got == want
  health = srv.get("/health")   # some decode steps served several requests at once
  assert health["slot_steps"] - before["slot_steps"] > health["steps"] - before["steps"]


def test_openai_client_round_trip(srv):
  import openai
  client = openai.OpenAI(base_url=srv.url + "/v1", api_key="not-needed", max_retries=0)
  assert [m.id for m in client.models.list()] == [MODEL]
  png = png_bytes(seed=3)
  msgs = [user("Is it normal?", data_uri(png))]
  want, n_prompt = expected(srv, "Is it normal?", [load_image(png)])
  out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=MAX_NEW,
                                       temperature=0)
  assert out.choices[0].message.content == want.text
  assert out.choices[0].finish_reason == want.finish_reason
  assert out.usage.prompt_tokens == n_prompt
  stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=MAX_NEW,
                                          temperature=0, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text
  with pytest.raises(openai.NotFoundError, match="not served here"):
    client.chat.completions.create(model="gpt-4o", messages=msgs)


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(srv):
  big = png_bytes(600, 600, seed=None)                            # 360k px > 512 x 512
  huge_body = data_uri(np.random.default_rng(0).bytes(LIMITS["max_request_bytes"]))
  tiny = data_uri(png_bytes(8, 8))
  cases = [  # (messages or raw body, extra fields, status, code, words in the message)
      ([user(Q, "data:image/png;base64,@@not-base64@@")], {}, 400, "bad_base64", "broken base64"),
      ([user(Q, "data:image/png,rawbytes")], {}, 400, "bad_image_url", "must be base64"),
      ([user(Q, data_uri(b"not an image"))], {}, 400, "corrupt_image", "cannot decode"),
      ([user(Q, "../outside.png")], {}, 400, "path_escape", "image root"),
      ([user(Q, "/etc/hostname")], {}, 400, "path_escape", "image root"),
      ([user(Q, "nope.png")], {}, 400, "missing_image", "nope.png"),
      ([user(Q, "https://example.com/x.png")], {}, 400, "remote_image_url", "not fetched"),
      ([user(Q, data_uri(big))], {}, 400, "too_large", "600x600"),
      ([user(Q, huge_body)], {}, 413, "request_too_large", "limit"),
      ([user(Q)], {"model": "gpt-4o"}, 404, "model_not_found", "gpt-4o"),
      ([user(Q)], {"max_tokens": LIMITS["max_tokens"] + 1}, 400, "max_tokens_too_large",
       str(LIMITS["max_tokens"])),
      ([user(Q)], {"max_tokens": 0}, 400, None, "max_tokens"),
      ([user(Q)], {"temperature": 3}, 400, None, "temperature"),
      ([user(Q)], {"top_p": 0}, 400, None, "top_p"),
      ([user(Q)], {"n": 9}, 400, None, "n must be in [1, 8]"),
      ([user(Q)], {"tools": []}, 400, None, "tools is not supported"),
      ([user(Q)], {"stop": [""]}, 400, None, "stop"),
      ([user(Q)], {"stream": "yes"}, 400, None, "stream must be true or false"),
      ([], {}, 400, None, "non-empty list"),
      ([user(Q), {"role": "assistant", "content": "x"}], {}, 400, None, "end with a user"),
      ([{"role": "tool", "content": "x"}], {}, 400, None, "role"),
      ([user("look: <image>")], {}, 400, None, "image marker"),
      ([user(Q, *[tiny] * 5)], {}, 400, "too_many_images", "at most 4"),
      ([user(" ".join(["word"] * 150))], {}, 400, "context_length_exceeded", "context"),
      ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": tiny}}]},
        user(Q)], {}, 400, None, "only user messages can hold images"),
      (b"{not json", {}, 400, None, "not JSON"),
  ]
  for messages, extra, status, code, words in cases:
    if isinstance(messages, bytes):
      r = httpx.post(srv.url + "/v1/chat/completions", content=messages, timeout=60)
    else:
      r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                     json={"model": MODEL, "messages": messages, **extra})
    assert r.status_code == status, (words, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert words in err["message"] and (code is None or err["code"] == code), (words, err)
  r = httpx.get(srv.url + "/no/such/route")
  assert r.status_code == 404 and r.json()["error"]["message"]
  assert ask(srv, [user(Q, "slide.png")]).status_code == 200      # still serving


def test_an_unstated_max_tokens_shrinks_to_the_context_a_stated_one_does_not(srv):
  from serve import api
  limits = srv_limits(srv)
  body = {"messages": [user(" ".join(["word"] * 27))]}
  req = api.parse(body, SamplingParams(max_tokens=MAX_NEW), limits)
  prompt = api.to_prompt(req, srv.gen.config, srv.gen.tokenizer, limits)
  context = srv.gen.config.llm.max_positions
  assert len(prompt.ids) + MAX_NEW > context and req.max_tokens == context - len(prompt.ids) > 0
  req = api.parse({**body, "max_tokens": MAX_NEW}, SamplingParams(), limits)
  with pytest.raises(api.ApiError, match="exceeds the model's context of 128"):
    api.to_prompt(req, srv.gen.config, srv.gen.tokenizer, limits)


def test_a_client_that_leaves_stops_its_row(srv):
  q = "Tell me everything."
  want, _ = expected(srv, q, max_tokens=LIMITS["max_tokens"])
  assert want.finish_reason == "length"   # the full answer would take all 32 tokens
  before = srv.get("/health")["cancelled"]
  body = {"model": MODEL, "messages": [user(q)], "temperature": 0, "stream": True,
          "max_tokens": LIMITS["max_tokens"]}
  with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
    for line in r.iter_lines():
      if '"content": "' in line and '"content": ""' not in line:
        break   # the first piece of text: hang up
  deadline = time.monotonic() + 20
  while srv.get("/health")["cancelled"] == before and time.monotonic() < deadline:
    time.sleep(0.02)
  health = srv.get("/health")
  assert health["cancelled"] == before + 1
  assert ask(srv, [user(Q)]).status_code == 200


def test_full_queue_answers_503_and_api_key_is_required(srv):
  """A second app on another engine of the same programs: a queue bound of 1 (with every slot
  busy, the next request waits and the ones after it get 503) and an API key."""
  gen = srv.gen
  engine = Engine(gen.model, gen.params, gen.tokenizer, layout=srv.engine.layout, mesh=gen.mesh,
                  rules=gen.rules, max_queue=1)
  app = create_app(engine, model_name=MODEL, limits=srv_limits(srv), api_key="sekret-key",
                   defaults=SamplingParams(max_tokens=LIMITS["max_tokens"]))
  other = Running(app)
  try:
    auth = {"Authorization": "Bearer sekret-key"}
    assert httpx.get(other.url + "/v1/models").status_code == 401
    r = httpx.get(other.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert "sekret" not in r.text
    assert httpx.get(other.url + "/v1/models", headers=auth).json()["data"][0]["id"] == MODEL
    assert httpx.get(other.url + "/").status_code == 200          # the page itself is public
    body = {"model": MODEL, "messages": [user(Q)], "temperature": 0, "ignore_eos": True}
    replies = []
    clients = [threading.Thread(target=lambda: replies.append(httpx.post(
        other.url + "/v1/chat/completions", json=body, headers=auth, timeout=60)))
        for _ in range(ROWS + 4)]
    for t in clients:
      t.start()
    for t in clients:
      t.join(60)
    busy = [r for r in replies if r.status_code == 503]
    assert busy and all(r.headers["retry-after"] == "1" and "server busy" in
                        r.json()["error"]["message"] for r in busy)
    assert sorted({r.status_code for r in replies}) == [200, 503]
  finally:
    other.close()


def srv_limits(srv):
  from serve import api
  return api.Limits(**LIMITS, image_root=srv.image_root)


def test_judge_and_synth_run_against_our_server(srv, tmp_path):
  """evaluation.judge and data.synth, pointed at our server, record the tiny model's replies.
  (Prompts kept short: the tiny model's context is 128 tokens.)"""
  from data import synth
  from evaluation import judge
  rule = tmp_path / "rule.json"
  rule.write_text(json.dumps({"kind": "single", "score_range": [0, 10], "system": "J",
                              "template": "{question}\n{answer}{rule}", "rule": ""}))
  questions = tmp_path / "q.jsonl"
  questions.write_text("".join(json.dumps({"question_id": i, "text": f"S{i}?",
                                           "gpt4_answer": "s", "fig_caption": "c"})
                               + "\n" for i in range(3)))
  answers = tmp_path / "a.jsonl"
  answers.write_text("".join(json.dumps({"question_id": i, "text": f"B{i}"}) + "\n"
                             for i in range(3)))
  out = tmp_path / "reviews.jsonl"
  judge.main(["--rule", str(rule), "--questions", str(questions), "--answers", str(answers),
              "--out", str(out), "--base-url", srv.url + "/v1", "--model", MODEL,
              "--temperature", "0", "--max-tokens", str(MAX_NEW), "--max-retries", "0"])
  reviews = {r["question_id"]: r for r in map(json.loads, out.read_text().splitlines())}
  loaded = judge.Rule.load(str(rule))
  qs = {q["question_id"]: q for q in judge.load_questions(str(questions))}
  assert sorted(reviews) == ["0", "1", "2"]
  for qid, review in reviews.items():
    system, user_msg = loaded.messages(qs[qid], f"B{qid}")
    want, _ = expected(srv, user_msg["content"], system=system["content"])
    assert review["content"] == want.text

  prompt = tmp_path / "prompt.json"
  prompt.write_text(json.dumps({"system": "W", "caption": "{caption}"}))
  figures = tmp_path / "figs.jsonl"
  figures.write_text("".join(json.dumps({"pair_id": f"p{i}", "image": f"p{i}.jpg",
                                         "caption": f"C{i}", "mentions": []}) + "\n"
                             for i in range(2)))
  synth_out = tmp_path / "synth.json"
  synth.main(["--figures", str(figures), "--out", str(synth_out), "--prompt", str(prompt),
              "--endpoint", f"ours={srv.url}/v1,{MODEL}", "--temperature", "0",
              "--max-tokens", str(MAX_NEW), "--max-retries", "0"])
  rows = {r["id"]: r for r in map(json.loads, synth.progress_path(synth_out).read_text()
                                  .splitlines())}
  assert sorted(rows) == ["p0", "p1"]
  for i in range(2):
    want, _ = expected(srv, f"C{i}", system="W")
    assert rows[f"p{i}"]["raw"] == want.text and rows[f"p{i}"]["model"] == MODEL


@pytest.mark.slow  # ~15 s: a fresh process loads and compiles the model
def test_python_m_serve_end_to_end(tmp_path):
  from tests.tiny_ckpt import shared_llava_checkpoint
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()
  env = dict(os.environ, MEDVLM_COMPILE_CACHE="off")
  proc = subprocess.Popen([sys.executable, "-m", "serve", "--ckpt", shared_llava_checkpoint(),
                           "--port", str(port), "--max-new-tokens", "8",
                           "--served-model-name", MODEL], env=env, stderr=subprocess.PIPE,
                          text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
      try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
      time.sleep(0.2)
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Hi?"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
    assert "medvlm-jax chat" in httpx.get(url + "/").text
  finally:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
  assert "serving 'tiny-llava'" in err and f"http://127.0.0.1:{port}/" in err
