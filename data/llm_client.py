"""OpenAI-compatible chat client and the command-line plumbing shared by `data.synth`, `data.ldrt`
and `evaluation.judge`.

One place for what every LLM-driven job needs: endpoints named on the command line (URL, model, weight,
the *name* of the environment variable holding the key), a seeded weighted split of requests across
endpoints, retries with exponential backoff on 429 / 5xx / timeouts, a thread pool with a concurrency
limit and token accounting. Their progress goes to a `data.jsonfile.JsonlStore`, flushed per row so
a killed job resumes where it stopped. Keys are read from the environment at request time and never
logged or written.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import random
import threading
import time
import urllib.parse
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from data.errors import BadSample, UserError

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


class LLMError(RuntimeError):
  """A request that failed for good (non-retryable status, or retries exhausted)."""

  def __init__(self, message: str, *, status: Optional[int] = None, retryable: bool = False,
               retry_after: float = 0.0):
    super().__init__(message)
    self.status, self.retryable, self.retry_after = status, retryable, retry_after


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """One OpenAI-compatible server: `base_url` ends where `/chat/completions` starts (e.g. .../v1)."""
  name: str
  base_url: str
  model: str
  weight: float = 1.0
  key_env: Optional[str] = DEFAULT_KEY_ENV

  @classmethod
  def parse(cls, spec: str, default_key_env: Optional[str] = DEFAULT_KEY_ENV) -> "Endpoint":
    """`NAME=URL,MODEL[,WEIGHT[,KEY_ENV]]`, e.g. `llama=http://gpu1:8000/v1,meta-llama/Llama-3-70B,0.75`."""
    name, sep, rest = spec.partition("=")
    parts = [p.strip() for p in rest.split(",")] if sep else []
    if not name.strip() or not 2 <= len(parts) <= 4 or not all(parts):
      raise UserError(f"bad endpoint {spec!r}: expected NAME=URL,MODEL[,WEIGHT[,KEY_ENV]]")
    url = urllib.parse.urlparse(parts[0])
    if url.scheme not in ("http", "https") or not url.netloc:
      raise UserError(f"bad endpoint {name!r}: URL must be http(s)://host[:port]/path, got {parts[0]!r}")
    try:
      weight = float(parts[2]) if len(parts) > 2 else 1.0
    except ValueError:
      raise UserError(f"bad endpoint {name!r}: weight {parts[2]!r} is not a number") from None
    if not weight > 0:
      raise UserError(f"bad endpoint {name!r}: weight must be > 0")
    return cls(name.strip(), parts[0].rstrip("/"), parts[1], weight,
               parts[3] if len(parts) > 3 else default_key_env)

  @property
  def url(self) -> str:
    """Where the openai client posts (named in connection errors)."""
    return self.base_url + "/chat/completions"

  def api_key(self) -> Optional[str]:
    return os.environ.get(self.key_env) if self.key_env else None


@dataclasses.dataclass
class Usage:
  requests: int = 0
  retries: int = 0
  failures: int = 0
  prompt_tokens: int = 0
  completion_tokens: int = 0


@dataclasses.dataclass
class ChatResult:
  text: str
  endpoint: str
  model: str
  prompt_tokens: int
  completion_tokens: int
  finish_reason: Optional[str]
  attempts: int


def _is_loopback(url: str) -> bool:
  host = urllib.parse.urlparse(url).hostname or ""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


class ChatClient:
  """Thread-safe chat-completions client over one or more endpoints, one `openai.OpenAI` each.

  `pick(key)` assigns a request to an endpoint by weight with a RNG seeded from (seed, key), so the
  split is reproducible, independent of order and concurrency, and stable across resumed runs. The
  openai client's own retries are off: ours count attempts per endpoint and honour Retry-After.
  """

  def __init__(self, endpoints: Iterable[Endpoint], *, timeout: float = 120.0, max_retries: int = 5,
               backoff: float = 1.0, max_backoff: float = 60.0, seed: int = 0,
               params: Optional[dict] = None, sleep: Callable[[float], None] = time.sleep):
    self.endpoints = list(endpoints)
    if not self.endpoints:
      raise UserError("no endpoint given")
    names = [e.name for e in self.endpoints]
    if len(set(names)) != len(names):
      raise UserError(f"endpoint names must be unique: {names}")
    self.timeout, self.max_retries, self.seed = timeout, max_retries, seed
    self.backoff, self.max_backoff, self.params, self._sleep = backoff, max_backoff, dict(params or {}), sleep
    self._lock = threading.Lock()
    self.usage = {e.name: Usage() for e in self.endpoints}
    self._jitter = random.Random()
    self._clients = {e.name: self._openai(e) for e in self.endpoints}

  def _openai(self, ep: Endpoint):
    import openai
    # The key goes per request (read from the environment then); this placeholder is never sent.
    # A server on this machine is reached directly, not through an HTTP(S)_PROXY of the environment.
    http = openai.DefaultHttpxClient(trust_env=False) if _is_loopback(ep.base_url) else None
    return openai.OpenAI(base_url=ep.base_url, api_key="per-request", timeout=self.timeout, max_retries=0,
                         http_client=http)

  def pick(self, key: str) -> Endpoint:
    total = sum(e.weight for e in self.endpoints)
    x = random.Random(f"{self.seed}\0endpoint\0{key}").random() * total
    for e in self.endpoints:
      x -= e.weight
      if x < 0:
        return e
    return self.endpoints[-1]

  def _count(self, name: str, **delta: int) -> None:
    with self._lock:
      u = self.usage[name]
      for k, v in delta.items():
        setattr(u, k, getattr(u, k) + v)

  def chat(self, messages: list[dict], *, key: Optional[str] = None, endpoint: Optional[Endpoint] = None,
           **params: Any) -> ChatResult:
    """One completion, retried on transient failures. Raises LLMError when it gives up."""
    ep = endpoint or (self.pick(key) if key is not None else self.endpoints[0])
    body = {"model": ep.model, "messages": messages, **self.params, **params}
    attempt = 0
    while True:
      attempt += 1
      self._count(ep.name, requests=1)
      try:
        result = self._complete(ep, body, attempt)
        self._count(ep.name, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
        return result
      except LLMError as e:
        err = e
      if not err.retryable or attempt > self.max_retries:
        self._count(ep.name, failures=1)
        raise LLMError(f"{err} (after {attempt} attempt(s))", status=err.status, retryable=err.retryable)
      delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + 0.5 * self._jitter.random())
      delay = max(delay, min(self.max_backoff, err.retry_after))
      log.warning("%s; retry %d/%d in %.2fs", err, attempt, self.max_retries, delay)
      self._count(ep.name, retries=1)
      self._sleep(delay)

  def _complete(self, ep: Endpoint, body: dict, attempt: int) -> ChatResult:
    """One request; every failure becomes an LLMError saying whether a retry may help."""
    import openai
    key = ep.api_key()

    def fail(msg: str, status=None, retryable=True, retry_after=0.0):
      if key:
        msg = msg.replace(key, "***")
      return LLMError(f"endpoint {ep.name}: {msg}", status=status, retryable=retryable,
                      retry_after=retry_after)

    # Only the key this endpoint names is sent: no OPENAI_ORG_ID / OPENAI_PROJECT_ID headers the
    # openai client would add from the environment.
    headers = {"Authorization": f"Bearer {key}" if key else openai.Omit(),
               "OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()}
    try:
      resp = self._clients[ep.name].chat.completions.create(**body, extra_headers=headers)
    except openai.APIStatusError as e:
      try:
        retry_after = float(e.response.headers.get("Retry-After", 0) or 0)
      except ValueError:
        retry_after = 0.0
      code = e.status_code
      raise fail(f"HTTP {code} {e.message.strip()[:200]!r}", code, code in RETRY_STATUS or code >= 500,
                 retry_after) from None
    except openai.APIConnectionError as e:
      reason = e.__cause__ or e  # the httpx error says more than "Connection error."
      raise fail(f"connection to {ep.url} failed or timed out "
                 f"({type(reason).__name__}: {reason})") from None
    except (ValueError, openai.APIResponseValidationError) as e:  # a body that is not JSON
      raise fail(f"response is not JSON ({type(e).__name__})") from None
    try:
      choice = resp.choices[0]
      usage = resp.usage
      return ChatResult(choice.message.content or "", ep.name, ep.model,
                        int(getattr(usage, "prompt_tokens", 0) or 0),
                        int(getattr(usage, "completion_tokens", 0) or 0), choice.finish_reason, attempt)
    except (KeyError, IndexError, TypeError, AttributeError) as e:
      raise fail(f"response without choices[0].message ({type(e).__name__}: {str(e)[:120]})") from None


def add_client_args(p: argparse.ArgumentParser, *, temperature: float, max_tokens: int) -> None:
  """The request flags every LLM job shares."""
  g = p.add_argument_group("LLM requests")
  g.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
  g.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
  g.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts per request")
  g.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each time")
  g.add_argument("--temperature", type=float, default=temperature, help="sampling temperature (default %(default)s)")
  g.add_argument("--max-tokens", type=int, default=max_tokens, help="completion length limit")
  g.add_argument("--limit", type=int, default=None, help="process at most N pending rows, then stop")


def client_from_args(args: argparse.Namespace, endpoints: list[Endpoint], seed: int = 0) -> ChatClient:
  return ChatClient(endpoints, timeout=args.timeout, max_retries=args.max_retries, backoff=args.backoff,
                    seed=seed, params={"temperature": args.temperature, "max_tokens": args.max_tokens})


def settle(rid: str, res, err: Optional[BaseException], counts: dict, store, parse: Callable,
           **fields) -> None:
  """One pool result (synth and ldrt): a failed request is logged and counted (errors that are
  not LLMError propagate); a reply is stored as a row, "ok" with parse(text)'s fields or
  "rejected" with the BadSample's reason, so a rerun skips it either way."""
  if err is not None:
    if not isinstance(err, LLMError):
      raise err
    log.error("row %s: %s", rid, err)
    counts["request failed"] += 1
    return
  row = {"id": rid, **fields, "endpoint": res.endpoint, "model": res.model,
         "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
         "raw": res.text}
  try:
    row.update(status="ok", **parse(res.text))
    counts["ok"] += 1
  except BadSample as e:
    row.update(status="rejected", reason=e.reason, detail=str(e))
    counts["rejected"] += 1
  store.append(row)


def run_pool(tasks: list, work: Callable[[Any], Any], on_done: Callable[[Any, Any, Optional[BaseException]], None],
             *, concurrency: int, description: str) -> None:
  """Run `work(task)` on a thread pool with at most `concurrency` in flight; `on_done(task, result, error)`
  runs on the calling thread (so file writes need no locking) and a rich bar shows progress."""
  from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
  concurrency = max(1, concurrency)
  with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=console(), transient=False) as bar, \
      futures.ThreadPoolExecutor(concurrency) as pool:
    tid = bar.add_task(description, total=len(tasks))
    it, pending = iter(tasks), {}
    try:
      while True:
        while len(pending) < 2 * concurrency:
          task = next(it, _END)
          if task is _END:
            break
          pending[pool.submit(work, task)] = task
        if not pending:
          break
        done, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
        for f in done:
          task = pending.pop(f)
          err = f.exception()
          on_done(task, None if err else f.result(), err)
          bar.advance(tid)
    except BaseException:
      for f in pending:
        f.cancel()
      raise


_END = object()


def console():
  """stderr console; 120 columns when not a terminal so summary tables in logs do not wrap."""
  from rich.console import Console
  con = Console(stderr=True)
  if not con.is_terminal:
    con.width = max(con.width, 120)
  return con


def usage_table(client: ChatClient, title: str = "tokens used (this run)"):
  from rich.table import Table
  t = Table(title=title)
  t.add_column("endpoint")
  t.add_column("model", overflow="fold")
  for col in ("requests", "retries", "failed", "tokens in", "tokens out"):
    t.add_column(col, justify="right", no_wrap=True)
  for e in client.endpoints:
    u = client.usage[e.name]
    t.add_row(e.name, e.model, *(str(x) for x in (u.requests, u.retries, u.failures, u.prompt_tokens,
                                                   u.completion_tokens)))
  return t


def finish(con, client: "ChatClient", run: dict) -> int:
  """A command's last words: tokens used, then exit status 1 with a retry hint if requests failed
  (the rerun picks them up; nothing finished is redone)."""
  con.print(usage_table(client))
  if run["request failed"]:
    con.print(f"[yellow]{run['request failed']} request(s) failed; run the same command again to retry them")
    return 1
  return 0


def counts_table(title: str, counts: dict):
  from rich.table import Table
  t = Table(title=title)
  t.add_column("what")
  t.add_column("count", justify="right")
  for k, v in counts.items():
    t.add_row(str(k), str(v))
  return t


def find_named_file(name_or_path: str, directory: Path, names: dict, what: str) -> Path:
  """A path as given, else a short name from `names` (or a file name, `.json` optional) in `directory`."""
  path = Path(name_or_path)
  if path.exists():
    return path
  name = names.get(name_or_path, name_or_path)
  path = directory / (name if name.endswith(".json") else name + ".json")
  if not path.exists():
    raise FileNotFoundError(f"{what} {name_or_path!r} not found (names: {', '.join(names)}, or a JSON path)")
  return path
