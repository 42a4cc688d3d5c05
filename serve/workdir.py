"""What a --ckpt path stands for: a checkpoint dir of this project or a HF model dir as is, or a
`train.main` workdir for the model it wrote. It knows train.main's workdir layout, so it lives
above vlm (which only reads checkpoint dirs)."""
from __future__ import annotations

import os

from data.errors import UserError
from data.jsonfile import load_json
from vlm.checkpoint import is_checkpoint, looks_like_checkpoint


def resolve(path) -> str:
  """The model dir `path` stands for: a checkpoint dir of this project or a HF model dir as is; a
  `train.main` workdir for the model it wrote, as model.init reads a workdir: WORKDIR/final, or for
  a chained config (configs/demo.py) the last stage's WORKDIR/<stage>/final (the last stage is the
  one no other stage starts from). Anything else is a UserError saying what the path holds."""
  path = os.fspath(path)
  if is_checkpoint(path) or os.path.isfile(os.path.join(path, "config.json")):
    _refuse_llava_layout(path)
    return path
  if not os.path.isdir(path):
    raise UserError(f"no such checkpoint dir or training workdir: {path}")
  final = os.path.join(path, "final")
  if looks_like_checkpoint(final):   # a damaged one is said as such when it is loaded
    return final
  if any(os.path.exists(os.path.join(path, f)) for f in ("train_config.json", "checkpoints")):
    raise UserError(_unfinished(path, path, "the run"))
  stages = {d: os.path.join(path, d) for d in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, d, "train_config.json"))}
  inits = [load_json(os.path.join(d, "train_config.json")).get("model", {}).get("init")
           for d in stages.values()]
  starts = {os.path.abspath(i) for i in inits if isinstance(i, str) and i}
  last = [n for n, d in stages.items()
          if not {os.path.abspath(d), os.path.abspath(os.path.join(d, "final"))} & starts]
  if len(last) == 1:
    d = stages[last[0]]
    if is_checkpoint(os.path.join(d, "final")):
      return os.path.join(d, "final")
    raise UserError(_unfinished(path, d, f"its last stage {last[0]!r}"))
  raise UserError(f"{path} is neither a checkpoint of this project (config.json + params/), a HF "
                  "model dir (config.json + weights) nor a train.main workdir (final/, or "
                  "STAGE/final of a chained config)")


def _refuse_llava_layout(path: str):
  """A LLaVA code-base dir (config.json with mm_* keys) is read by `convert import` only."""
  conf = os.path.join(path, "config.json")
  if is_checkpoint(path) or not os.path.isfile(conf):
    return
  d = load_json(conf)
  if isinstance(d, dict) and ("mm_vision_tower" in d or "mm_projector_type" in d):
    raise UserError(f"{path} is a LLaVA code-base model (mm_* keys in config.json): convert it "
                    f"first: python -m convert import --from llava {path} --out DIR, then pass "
                    "DIR")


def _unfinished(workdir: str, stage_dir: str, what: str) -> str:
  ckpts = os.path.join(stage_dir, "checkpoints")
  steps = sorted(int(s) for s in (os.listdir(ckpts) if os.path.isdir(ckpts) else ()) if s.isdigit())
  done = (f"its newest train checkpoint, step {steps[-1]}, holds the trained weights and optimizer "
          "state, not a model" if steps else "no checkpoint yet")
  final = os.path.join(stage_dir, "final")
  return (f"training workdir {workdir}: {what} has not finished (no {final}; {done}); rerun the "
          "same train.main command to finish it")
