"""What a compiled program needs on its device, and what the device has.

One reading of XLA's buffer assignment for every caller that must know whether a program fits
before it runs: `train.aot` (compiled for a target without one) and the serving engine's
start-up check of its KV cache. Bytes are per device."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  argument: int    # inputs resident while the program runs (params, optimizer state, batch)
  output: int
  alias: int       # outputs written into donated inputs: counted once, in `argument`
  temp: int        # activations and scratch
  code: int
  peak: int        # XLA's own peak where the backend reports one, else the sum above

  @classmethod
  def of(cls, compiled) -> "ProgramMemory":
    """From a `jax.stages.Compiled` (`jax.jit(f).lower(...).compile()`)."""
    m = compiled.memory_analysis()
    arg, out, alias, temp = (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                             int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))
    code = int(m.generated_code_size_in_bytes)
    summed = arg + out - alias + temp + code
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    return cls(arg, out, alias, temp, code, peak or summed)


def device_bytes(device) -> Optional[int]:
  """The memory a device lets programs use (XLA's bytes_limit), or None where the backend does
  not say (the CPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def gib(n: int) -> str:
  """Bytes as GiB with two decimals, as every memory report here prints them."""
  return f"{n / 2**30:.2f}"
