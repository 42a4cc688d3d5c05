"""What train.aot reads out of a compiled program: per-device memory against the target's, the
collectives and fused kernels in its HLO, XLA's FLOP count and a roofline estimate of its time.

HLO is read statically: a collective or kernel inside a while loop (the decoder's layer scan, the
gradient-accumulation scan) appears once, and XLA's cost analysis counts a loop body once too.
The FLOPs the estimate divides are therefore the analytic model FLOPs (train/metrics.py)."""
from __future__ import annotations

import re
import time

from vlm.compiled import ProgramMemory, gib

HEADROOM = 0.08   # --search keeps at least this fraction of the device's memory free
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
# (label, pattern in the optimized HLO text)
KERNELS = (("cuDNN fMHA", r'custom_call_target="__cudnn\$fmha'),
           ("cuDNN fusion", r'"kind":"__cudnn\$fusion"|kind=kCustom.*__cudnn\$fusion'),
           ("Triton gemm", r'"kind":"__triton_gemm"'),
           ("Triton fusion", r'"kind":"__triton"'),
           ("Pallas/Triton call", r'custom_call_target="__gpu\$xla\.gpu\.triton"'),
           ("cuBLAS gemm", r'custom_call_target="__cublas\$(?:lt\$)?matmul'),
           ("Mosaic (Pallas TPU / splash)", r'custom_call_target="tpu_custom_call"'))
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def _shape_bytes(text: str) -> int:
  total = 0
  for dt, dims in _SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES.get(dt, 4)
  return total


def collectives(hlo: str) -> dict:
  """{kind: (count, bytes of the results)} over the HLO's instructions (async pairs once)."""
  out = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(",
                 line)
    if not m:
      continue
    c, b = out.get(m.group(2), (0, 0))
    shape = m.group(1)
    if m.group(3) and shape.startswith("("):   # *-start returns (operands, results, ...)
      parts = re.findall(r"[a-z0-9]+\[[0-9,]*\]", shape)
      shape = " ".join(parts[len(parts) // 2:]) if len(parts) > 1 else shape
    out[m.group(2)] = (c + 1, b + _shape_bytes(shape))
  return out


def kernels(hlo: str) -> dict:
  found = {}
  for label, pattern in KERNELS:
    n = len(re.findall(pattern, hlo))
    if n:
      found[label] = n
  return found


def xla_flops(compiled, lowered):
  """(FLOPs, source) of XLA's cost analysis: the compiled program's where the backend gives one
  (XLA:TPU), else the lowered (pre-optimization) module's."""
  for what, obj in (("compiled", compiled), ("lowered", lowered)):
    try:
      ca = obj.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
      continue
    ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca
    if ca and ca.get("flops"):
      return float(ca["flops"]), what, float(ca.get("bytes accessed", 0) or 0)
  return None, None, 0.0


NO_TILING = "Couldn't find output tile sizes"
OOM = "Ran out of memory"


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]


def analyze(program, target, devices_n: int) -> dict:
  """Compile one Program (train/aot_programs.py) for the target and read it out."""
  t0, note = time.perf_counter(), None
  try:
    lowered = program.fn.lower(*program.args)
    try:
      compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001
      if target.platform != "gpu" or NO_TILING not in str(e):
        raise
      # Deviceless XLA:GPU cannot autotune; its default Triton tiling of some float32 dots
      # (the S2 tiler's highest-precision resize) fails where a device would fall back to
      # another config. Those dots go to cuBLAS instead; the report says so.
      compiled = lowered.compile(compiler_options={"xla_gpu_enable_triton_gemm": False})
      note = ("compiled with xla_gpu_enable_triton_gemm=false: the deviceless compile's "
              f"Triton tiling failed ({_first_line(e)[:160]})")
  except Exception as e:  # noqa: BLE001 - XLA's refusal is the finding: reported, not raised
    out = {"program": program.name, "compile_s": round(time.perf_counter() - t0, 1),
           "error": _first_line(e)[:300]}
    if OOM in str(e):   # XLA:TPU refuses to compile what cannot fit
      out["fits"] = False
    return out
  secs = time.perf_counter() - t0
  mem = ProgramMemory.of(compiled)
  hlo = compiled.as_text() or ""
  limit = target.usable()
  flops, source, _ = xla_flops(compiled, lowered)
  per_dev = program.flops / devices_n if program.flops else 0.0
  coll = collectives(hlo)
  out = {"program": program.name, "compile_s": round(secs, 1),
         "memory": {"argument": mem.argument, "output": mem.output, "alias": mem.alias,
                    "temp": mem.temp, "peak": mem.peak},
         "limit": limit, "hbm": target.hbm, "fits": mem.peak <= limit,
         "headroom": (limit - mem.peak) / limit,
         "xla_flops": flops, "xla_flops_source": source,
         "model_flops": program.flops, "model_flops_per_device": per_dev,
         "collectives": {k: {"count": c, "bytes": b} for k, (c, b) in coll.items()},
         "kernels": kernels(hlo)}
  if note:
    out["note"] = note
  if per_dev:
    out["estimate"] = roofline(per_dev, mem, program.loops, coll, target)
  return out


def roofline(flops: float, mem: ProgramMemory, loops: int, coll: dict, target) -> dict:
  """A lower bound on the step time, labelled as an estimate: the larger of the model FLOPs at
  the device's peak and the resident arguments read once per micro-batch at its HBM bandwidth,
  plus the collectives' result bytes (as the HLO lists them, loop bodies once) over its link."""
  compute = flops / target.peak_flops
  memory = loops * mem.argument / target.hbm_bw
  comm = sum(b for _, b in coll.values()) / target.link if target.devices_n > 1 else 0.0
  return {"step_s": max(compute, memory) + comm, "compute_s": compute, "memory_s": memory,
          "collective_s": comm, "bound": "compute" if compute >= memory else "memory",
          "label": "estimate (roofline: model FLOPs / peak, arguments / HBM bandwidth, "
                   "collective bytes / link; not a measurement)"}




def text(report: dict) -> str:
  """The human-readable report of train.aot."""
  t = report["target"]
  lines = [f"train.aot: {report['config']} for {t['name']} ({t['about']}; {t['devices']} devices, "
           f"mesh {report['mesh']}), attention {report['attention']}, remat {report['remat']}, "
           f"jax {report['versions']['jax']}"]
  for p in report["programs"]:
    if "error" in p:
      what = "DOES NOT FIT, XLA refused it" if p.get("fits") is False else "DOES NOT COMPILE"
      lines.append(f"\n{p['program']}: {what} ({p['compile_s']:.1f} s): {p['error']}")
      continue
    m = p["memory"]
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    lines.append(f"\n{p['program']}: compiled in {p['compile_s']:.1f} s")
    if p.get("note"):
      lines.append(f"  note: {p['note']}")
    lines.append(f"  per device: arguments {gib(m['argument'])} GiB, outputs {gib(m['output'])} "
                 f"GiB (aliased {gib(m['alias'])}), temp {gib(m['temp'])} GiB; peak "
                 f"{gib(m['peak'])} GiB of {gib(p['limit'])} GiB usable ({gib(p['hbm'])} GiB HBM)")
    lines.append(f"  {verdict}: headroom {p['headroom'] * 100:.1f}%")
    if p["model_flops"]:
      lines.append(f"  FLOPs per call: model {p['model_flops']:.3e} "
                   f"({p['model_flops_per_device']:.3e} per device)")
    if p["xla_flops"]:
      lines.append(f"  XLA cost analysis ({p['xla_flops_source']}, loop bodies once): "
                   f"{p['xla_flops']:.3e} FLOPs per device")
    coll = ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
                     for k, v in p["collectives"].items()) or "none"
    lines.append(f"  collectives (static, loop bodies once): {coll}")
    lines.append("  kernels: " + (", ".join(f"{k} x{n}" for k, n in p["kernels"].items())
                                  or "none of the fused kernels"))
    if "estimate" in p:
      e = p["estimate"]
      lines.append(f"  estimate (roofline, not measured): {e['step_s']:.3f} s per call, "
                   f"{e['bound']}-bound (compute {e['compute_s']:.3f} s, memory "
                   f"{e['memory_s']:.3f} s, collectives {e['collective_s']:.3f} s)")
  return "\n".join(lines)
