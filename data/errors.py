"""Bad-input errors shared by every data path: each names the sample and the file it came from."""
from __future__ import annotations

from typing import Optional


class BadSample(ValueError):
  """A sample that cannot be used. `reason` is a short stable key used for skip counters
  (e.g. 'missing_image', 'corrupt_image', 'template_mismatch', 'too_long', 'path_escape')."""

  def __init__(self, reason: str, message: str, *, sample_id=None, path: Optional[str] = None):
    self.reason, self.sample_id, self.path = reason, sample_id, path
    where = ", ".join(x for x in (f"sample {sample_id!r}" if sample_id is not None else "",
                                  f"file {path}" if path else "") if x)
    super().__init__(f"[{reason}] {message}" + (f" ({where})" if where else ""))
