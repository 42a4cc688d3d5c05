"""bench.suite's stage process: one benchmark command in its own process group, its output
streamed to the log as it comes, killed with its children at its timeout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def json_record(line: str):
  line = line.strip()
  if not line.startswith("{"):
    return None
  try:
    obj = json.loads(line)
  except ValueError:
    return None
  return obj if isinstance(obj, dict) else None


def run_command(cmd, timeout: float, log, env=None) -> dict:
  """Run cmd in its own process group, streaming stdout and stderr into `log` as they come.
  On timeout the whole group (the benchmark's own children too) gets SIGTERM, then SIGKILL.
  -> {status: ok | failed | timeout, rc, wall_s, stdout, stderr, records (JSON-object lines)}."""
  t = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace", bufsize=1, start_new_session=True)
  RUNNING.append(proc)
  out, err, records, lock = [], [], [], threading.Lock()

  def pump(stream, sink):
    for line in stream:
      with lock:
        sink.append(line)
        log.write(line)
        log.flush()
        rec = json_record(line)
        if rec is not None:
          records.append(rec)
  threads = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
  for th in threads:
    th.start()
  status = "ok"
  try:
    proc.wait(timeout=max(timeout, 0.1))
  except subprocess.TimeoutExpired:
    status = "timeout"
    kill_group(proc)
  finally:
    RUNNING.remove(proc)
  try:   # a benchmark's own children that outlived it would hold the pipes open
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  for th in threads:
    th.join(timeout=5)
  rc = proc.returncode
  if status == "ok" and rc != 0:
    status = "failed"
  return {"status": status, "rc": rc, "wall_s": time.monotonic() - t, "stdout": "".join(out),
          "stderr": "".join(err), "records": records}


RUNNING: list = []   # the running stage's process, for the SIGTERM handler


def kill_group(proc, grace: float = 5.0):
  """SIGTERM to the stage's process group, then SIGKILL to whatever of it is left."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
      pass
