"""The errors a user can cause, defined in the lowest layer that raises them (the model package
reads HF dirs and weight files): data/errors.py's `cli_errors` turns each into one `error:` line."""
from __future__ import annotations

from typing import Optional


class BadSample(ValueError):
  """A sample that cannot be used. `reason` is a short stable key used for skip counters
  (e.g. 'missing_image', 'corrupt_image', 'template_mismatch', 'too_long', 'path_escape')."""

  def __init__(self, reason: str, message: str, *, sample_id=None, path: Optional[str] = None):
    self.reason, self.message, self.sample_id, self.path = reason, message, sample_id, path
    where = ", ".join(x for x in (str(path) if path else "",
                                  f"sample {sample_id!r}" if sample_id is not None else "") if x)
    super().__init__(f"[{reason}] {message}" + (f" ({where})" if where else ""))


class UserError(ValueError):
  """A mistake in the user's input, files or command line (not a bug): reported as one line."""


class ConversionError(UserError):
  """A checkpoint of another format (HF, LLaVA, open_clip, PEFT) that cannot be read or written:
  one line naming the key, file and shapes involved."""
