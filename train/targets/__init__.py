"""The accelerators `python -m train.aot` compiles for without having one.

Each target names its compile-only devices (a GPU target-config text proto in this folder, or a
TPU topology that libtpu knows) and the peak numbers the roofline estimate divides by. Peak
figures are the vendors' dense bf16 tensor rates and HBM bandwidths (NVIDIA's H100 / H200 / A100 /
A40 datasheets, Google Cloud's TPU v5e / v5p / v6e pages; v5e's HBM is the 15.75 GiB libtpu's
out-of-memory message gives); `link` is the per-device interconnect
bandwidth one way (NVLink 4: 450 GB/s, NVLink 3: 300 GB/s, A40 on PCIe 4 x16: 32 GB/s, 400 Gb/s
InfiniBand between hosts: 50 GB/s, TPU ICI per chip).
"""
from __future__ import annotations

import dataclasses
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30
# JAX on a GPU lets programs use this fraction of HBM unless XLA_PYTHON_CLIENT_MEM_FRACTION says.
GPU_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str        # 'gpu' | 'tpu'
  topology: str        # GPU: "partitions x hosts x devices per host"; TPU: "v5p:2x2x1"
  spec: str            # GPU: the target-config proto in this folder; TPU: ""
  hbm: int             # bytes per device
  peak_flops: float    # dense bf16 per device
  hbm_bw: float        # bytes/s per device
  link: float          # bytes/s per device, one way (the slowest link a collective crosses)
  about: str

  @property
  def devices_n(self) -> int:
    return eval_product(self.topology.split(":")[-1])

  def usable(self) -> int:
    """Bytes a program may use per device: all of HBM on a TPU; on a GPU the fraction JAX's
    allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)."""
    if self.platform == "tpu":
      return self.hbm
    frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or GPU_MEM_FRACTION)
    return int(self.hbm * frac)

  def config_text(self) -> str:
    with open(os.path.join(HERE, self.spec)) as f:
      return f.read()


def eval_product(dims: str) -> int:
  n = 1
  for d in re.findall(r"\d+", dims):
    n *= int(d)
  return n


_H100 = dict(spec="h100_sxm.txtpb", hbm=84942979072, peak_flops=989.4e12, hbm_bw=3.35e12)
TARGETS = {t.name: t for t in (
    Target("h100", "gpu", "1x1x1", link=450e9, about="1x H100 SXM 80GB", **_H100),
    Target("h100x8", "gpu", "1x1x8", link=450e9, about="8x H100 SXM 80GB, one host (NVLink)",
           **_H100),
    Target("2x8", "gpu", "1x2x8", link=50e9, about="2 hosts x 8 H100 SXM (InfiniBand between)",
           **_H100),
    Target("h200", "gpu", "1x1x1", "h200.txtpb", 151397597184, 989.4e12, 4.8e12, 450e9,
           "1x H200 141GB"),
    Target("a100-80", "gpu", "1x1x1", "a100_sxm_80.txtpb", 85100068864, 312e12, 2.039e12, 300e9,
           "1x A100 SXM 80GB"),
    Target("a40x4", "gpu", "1x1x4", "a40.txtpb", 48305799168, 149.7e12, 696e9, 32e9,
           "4x A40 48GB on PCIe (the LDRT paper's hardware)"),
    Target("v5e-8", "tpu", "v5e:2x4", "", int(15.75 * GIB), 197e12, 819e9, 200e9,
           "TPU v5e, 8 chips"),
    Target("v5p-8", "tpu", "v5p:2x2x1", "", 95 * GIB, 459e12, 2765e9, 600e9,
           "TPU v5p-8: 4 chips (8 TensorCores)"),
    Target("v6e-8", "tpu", "v6e:2x4", "", 32 * GIB, 918e12, 1640e9, 448e9, "TPU v6e, 8 chips"),
    Target("v5p-128", "tpu", "v5p:4x4x4", "", 95 * GIB, 459e12, 2765e9, 600e9,
           "TPU v5p-128: 64 chips, 16 hosts"),
)}
