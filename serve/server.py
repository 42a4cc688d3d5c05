"""The HTTP server: an OpenAI-compatible API and the web chat page, over one serving engine
(serve/engine.py: continuous batching, each request with its own sampling parameters).

  POST /v1/chat/completions   text + image_url parts, stream (server-sent events); every
                              OpenAI parameter honoured or refused with a 400 naming it
                              (serve/api.py TABLE): sampling, penalties, logit_bias, seed, n,
                              logprobs / top_logprobs (serve/openai_shapes.py); vLLM's top_k
                              and ignore_eos
  GET  /v1/models             the one model served
  GET  /                      the chat page (serve/page.html)
  POST /preview               image bytes -> the PNG the page shows (DICOM rendered as the model
                              sees it)
  GET  /health                queue and engine counters

With an API key in the environment every route but / and /health wants `Authorization: Bearer
KEY`. Request bodies, image pixels, images per request and max_tokens are bounded (api.Limits);
a full queue answers 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import os
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from serve import api
from serve import openai_shapes as shapes
from serve import engine as E
from serve.sampling import SamplingParams

log = logging.getLogger(__name__)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
PREVIEW_SIDE = 512
DRAIN_FACTOR = 16  # an oversized body is read (and dropped) up to this x the limit, then cut


def create_app(engine: E.Engine, *, model_name: str, limits: api.Limits = api.Limits(),
               defaults: SamplingParams = SamplingParams(), system: Optional[str] = None,
               api_key: Optional[str] = None) -> FastAPI:
  """`engine`: compiled (warmup) or not, its loop not started (the app starts and closes it);
  `defaults`: sampling of requests that do not say; `system`: the system prompt of requests
  without one (None: the template's); `api_key`: what clients must send (None: nothing), read
  from the environment by the caller."""

  async def lifespan(app):
    engine.start()
    yield
    engine.close()

  app = FastAPI(title="medvlm-jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)
  app.state.model_name = model_name
  tokens = shapes.Tokens(engine.tokenizer)   # logprobs' token strings and bytes

  @app.exception_handler(api.ApiError)
  async def _api_error(request, e: api.ApiError):
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)

  @app.exception_handler(HTTPException)
  async def _http_error(request, e: HTTPException):
    return JSONResponse(api.ApiError(e.status_code, str(e.detail)).body(),
                        status_code=e.status_code)

  def authorize(request: Request) -> None:
    if api_key is None:
      return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             api_key.encode()):
      raise api.ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                         type="authentication_error", code="invalid_api_key")

  async def read_body(request: Request) -> bytes:
    limit = limits.max_request_bytes
    too_big = api.ApiError(413, f"request body over the server's limit of {limit} bytes",
                           code="request_too_large")
    declared = request.headers.get("content-length")
    chunks, n = [], 0
    async for chunk in request.stream():
      n += len(chunk)
      if n > limit * DRAIN_FACTOR:
        break
      if n <= limit and not (declared and declared.isdigit() and int(declared) > limit):
        chunks.append(chunk)
    if n > limit or (declared and declared.isdigit() and int(declared) > limit):
      raise too_big
    return b"".join(chunks)

  @app.get("/", response_class=HTMLResponse)
  async def page():
    with open(PAGE, encoding="utf-8") as f:
      return HTMLResponse(f.read())

  @app.get("/favicon.ico")
  async def favicon():
    return Response(status_code=204)

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, "waiting": engine.waiting(),
            "running": engine.running(), "slots": engine.layout.slots, **engine.stats}

  @app.get("/v1/models")
  async def models(request: Request):
    authorize(request)
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "medvlm-jax"}]}

  @app.post("/preview")
  async def preview(request: Request):
    authorize(request)
    raw = await read_body(request)
    png = await run_in_threadpool(_preview_png, raw, limits)
    return Response(png, media_type="image/png")

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    authorize(request)
    raw = await read_body(request)
    try:
      body = json.loads(raw)
    except ValueError as e:
      raise api.ApiError(400, f"the request body is not JSON: {e}") from None
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model != model_name:
      raise api.ApiError(404, f"model {str(model)[:80]!r} is not served here; this server serves "
                         f"{model_name!r} (GET /v1/models)", param="model",
                         code="model_not_found")
    req = api.parse(body, defaults, limits)
    req.system = system if req.system is None else req.system
    prompt = await run_in_threadpool(api.to_prompt, req, engine.config, engine.tokenizer,
                                     limits)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model_name}
    if req.tags:
      log.info("%s %s", meta["id"], " ".join(   # escaped: a client cannot forge log lines
          f"{k}={v.encode('unicode_escape').decode()}" for k, v in req.tags.items()))
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    jobs = [E.Request(prompt, req.choice_sampling(i),  # n choices: n rows of the engine
                          lambda e, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, e)))
            for i in range(req.n)]
    try:
      for job in jobs:
        engine.submit(job)
    except E.RequestError as e:
      _cancel(jobs)
      raise api.ApiError(400, str(e), param=e.param) from None
    except E.QueueFull as e:
      _cancel(jobs)
      raise api.ApiError(503, str(e), type="server_busy", code="queue_full") from None
    if req.stream:
      return StreamingResponse(_events(jobs, events, meta, req, tokens),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done = {}
    try:
      while len(done) < len(jobs):
        i, event = await events.get()
        if event.error is not None:
          raise api.ApiError(500, event.error, type="server_error")
        if event.done is not None:
          done[i] = event.done
    finally:
      _cancel(jobs)   # a client that left stops waiting in the queue / frees its slots
    lp = lambda g: [tokens.entry(t.token, t.logprob, t.top) for t in g.logprobs] \
        if req.sampling.logprobs else None
    return shapes.completion(
        meta, [shapes.choice(i, g.text, _finish(g), lp(g)) for i, g in sorted(done.items())],
        _usage(list(done.values())))

  return app


class Background:
  """`app` served by uvicorn on host:<a free port> in a daemon thread (tests, benchmarks,
  notebooks): `.url`, `.close()`."""

  def __init__(self, app, host: str = "127.0.0.1", timeout: float = 60.0):
    import socket
    import threading

    import uvicorn
    sock = socket.socket()
    sock.bind((host, 0))
    self.url = f"http://{host}:{sock.getsockname()[1]}"
    self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                   daemon=True)
    self.thread.start()
    deadline = time.monotonic() + timeout
    while not self.server.started:
      if time.monotonic() > deadline or not self.thread.is_alive():
        raise RuntimeError("the server did not start")
      time.sleep(0.02)

  def close(self) -> None:
    self.server.should_exit = True
    self.thread.join(10)


def _finish(gen) -> str:
  return "stop" if gen.finish_reason == "cancelled" else gen.finish_reason


def _cancel(jobs) -> None:
  for job in jobs:
    job.cancel()


def _usage(gens: list) -> dict:
  """prompt_tokens once (the choices share the prompt); completion_tokens: every choice's answer
  tokens, exactly those returned (a stop token or string not counted)."""
  return shapes.usage(gens[0].prompt_tokens, sum(int(len(g.tokens)) for g in gens))


async def _events(jobs: list, events: asyncio.Queue, meta: dict, req: api.ChatRequest, tokens):
  """Server-sent events in OpenAI's chunk format, the n choices interleaved by index; each chunk
  carries the logprobs of the tokens its text covers. A client that goes away cancels its rows."""
  usage, logprobs = req.include_usage, req.sampling.logprobs
  try:
    for i in range(len(jobs)):
      yield shapes.chunk(meta, i, {"role": "assistant", "content": ""}, include_usage=usage)
    done = {}
    while len(done) < len(jobs):
      i, event = await events.get()
      if event.error is not None:
        yield shapes.sse(api.ApiError(500, event.error, type="server_error").body())
        break
      if event.text or (logprobs and event.logprobs):
        content = [tokens.entry(t.token, t.logprob, t.top) for t in event.logprobs] \
            if logprobs else None
        yield shapes.chunk(meta, i, {"content": event.text}, content=content,
                           include_usage=usage)
      if event.done is not None:
        done[i] = event.done
        yield shapes.chunk(meta, i, {}, finish=_finish(event.done), include_usage=usage)
    else:
      if usage:
        yield shapes.usage_chunk(meta, _usage([done[i] for i in sorted(done)]))
    yield "data: [DONE]\n\n"
  finally:
    _cancel(jobs)


def _preview_png(raw: bytes, limits: api.Limits) -> bytes:
  from PIL import Image

  from data.errors import BadSample
  from data.image import load_image
  try:
    img = load_image(raw, max_pixels=limits.max_image_pixels)
  except BadSample as e:
    raise api.ApiError(400, f"preview: {e}", code=e.reason) from None
  im = Image.fromarray(img)
  im.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()
