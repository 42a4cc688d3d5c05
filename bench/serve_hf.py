"""transformers' own continuous batching (the manager behind `model.generate_batch`) driven by the
serving benchmark's workload: the same requests as token ids (text-only rows: the manager serves
causal LMs), the same closed loops and Poisson arrivals, streamed so every new token is seen when
the manager publishes it. In process: no HTTP in the way, the best case for this side.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Optional

from bench.serve_load import Timing, poisson_arrivals, summary


class HFContinuous:
  """The Llava's language model as a LlamaForCausalLM (the weights of a `convert export --to hf`
  dir; bfloat16 on a GPU, float32 on the CPU), under one started ContinuousBatchingManager
  sized for `slots` rows."""

  def __init__(self, hf_dir: str, *, slots: int = 64, context: int = 1024):
    import torch
    import transformers as T
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    torch.set_grad_enabled(False)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    llava = T.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=dtype)
    lm = T.AutoModelForCausalLM.from_config(llava.config.text_config, dtype=dtype)
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    del llava
    self.model = lm.to("cuda" if cuda else "cpu").eval()
    gc = T.GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=256)
    # Sized explicitly: left to itself the manager sizes its KV cache from the host's free memory.
    block = 64
    cbc = ContinuousBatchingConfig(block_size=block, num_blocks=slots * (-(-context // block)),
                                   max_batch_tokens=2048, max_requests_per_batch=slots)
    self.manager = self.model.init_continuous_batching(generation_config=gc,
                                                       continuous_batching_config=cbc)
    self.manager.start()
    self._records: dict = {}
    self._lock = threading.Lock()
    self._count = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._dispatch, daemon=True)
    self._thread.start()

  def close(self) -> None:
    self._stop.set()
    self._thread.join(10)
    self.manager.stop(block=True, timeout=30)

  def _dispatch(self) -> None:
    """Routes the manager's streamed outputs to their requests' timings."""
    while not self._stop.is_set():
      out = self.manager.get_result(timeout=0.05)
      if out is None:
        continue
      now = time.perf_counter()
      with self._lock:
        rec = self._records.get(out.request_id)
      if rec is None:
        continue
      timing, t0, done = rec
      n = len(out.generated_tokens)
      if n > timing.tokens:
        timing.chunks.append(now - t0 - timing.sent)
        timing.tokens = n
      if out.is_finished():
        done.set()

  def _submit(self, ids: list, max_tokens: int, t0: float) -> tuple:
    with self._lock:
      rid = f"bench_{self._count}"
      self._count += 1
      done = threading.Event()
      timing = Timing(sent=time.perf_counter() - t0, chunks=[])
      self._records[rid] = (timing, t0, done)
    self.manager.add_request(list(ids), request_id=rid, max_new_tokens=max_tokens,
                             streaming=True, eos_token_id=-1)
    return timing, done

  def run(self, rows: list, *, clients: Optional[int] = None, rate: Optional[float] = None,
          seed: int = 0) -> dict:
    """rows: [(prompt ids, max_tokens)]; a closed loop of `clients` or Poisson arrivals."""
    t0 = time.perf_counter()
    timings = []
    if clients:
      work = queue.SimpleQueue()
      for r in rows:
        work.put(r)

      def client():
        while True:
          try:
            ids, n = work.get_nowait()
          except queue.Empty:
            return
          timing, done = self._submit(ids, n, t0)
          done.wait()
          timings.append(timing)
      threads = [threading.Thread(target=client) for _ in range(clients)]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
    else:
      waits = []
      for at, (ids, n) in zip(poisson_arrivals(len(rows), rate, seed), rows):
        time.sleep(max(0.0, at - (time.perf_counter() - t0)))
        waits.append(self._submit(ids, n, t0))
      for timing, done in waits:
        done.wait()
        timings.append(timing)
    elapsed = time.perf_counter() - t0
    bad = [t.tokens for t, (_, n) in zip(timings, rows) if t.tokens != n] if not clients else []
    if bad or any(t.tokens < 1 for t in timings):
      raise RuntimeError(f"transformers returned short answers: {bad[:5]}")
    return summary(timings, elapsed)
