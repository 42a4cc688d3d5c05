"""A real OpenAI-compatible chat server on loopback for tests of data.synth, data.ldrt and
evaluation.judge: each request is answered by a test-supplied function, so tests can return canned
completions, malformed ones, 500s, 429s and slow replies, and inspect every request received."""
from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

TAG = re.compile(r"\[\[(.+?)\]\]")


@dataclasses.dataclass
class Reply:
  text: str = ""
  status: int = 200
  delay: float = 0.0
  body: Optional[bytes] = None  # raw body instead of a completion (to send garbage)
  headers: dict = dataclasses.field(default_factory=dict)


def tag_of(request: dict) -> str:
  """The `[[tag]]` a test planted in the last user message (the row's identity on the server side)."""
  m = TAG.search(request["messages"][-1]["content"])
  return m.group(1) if m else ""


class LLMServer:
  """`with LLMServer(reply) as srv:` serves POST /v1/chat/completions at `srv.url` on 127.0.0.1.

  `reply(request_json, attempt)` returns a Reply; `attempt` counts requests with the same tag (1, 2,
  ...), so a test can fail the first try of a row and answer the second. `srv.log` holds one dict per
  request: tag, model, attempt, status, system prompt, authorization header."""

  def __init__(self, reply: Callable[[dict, int], Reply]):
    self.reply, self.log, self._attempts, self._lock = reply, [], {}, threading.Lock()

  def __enter__(self):
    srv = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        tag = tag_of(req)
        with srv._lock:
          attempt = srv._attempts[tag] = srv._attempts.get(tag, 0) + 1
        r = srv.reply(req, attempt)
        with srv._lock:
          srv.log.append({"tag": tag, "model": req.get("model"), "attempt": attempt, "status": r.status,
                          "system": req["messages"][0]["content"] if req["messages"][0]["role"] == "system" else "",
                          "authorization": self.headers.get("Authorization"), "path": self.path})
        if r.delay:
          time.sleep(r.delay)
        body = r.body if r.body is not None else json.dumps(
            completion(r.text, req.get("model")) if r.status == 200 else {"error": {"message": "canned"}}).encode()
        try:
          self.send_response(r.status)
          for k, v in {"Content-Type": "application/json", **r.headers}.items():
            self.send_header(k, v)
          self.send_header("Content-Length", str(len(body)))
          self.end_headers()
          self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
          pass

    self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()

  def requests_for(self, tag: str) -> list[dict]:
    with self._lock:
      return [e for e in self.log if e["tag"] == tag]


def completion(text: str, model: Optional[str]) -> dict:
  return {"id": "cmpl-test", "object": "chat.completion", "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 11, "completion_tokens": max(1, len(text.split())),
                    "total_tokens": 11 + max(1, len(text.split()))}}
