"""Where a run's weights come from: model.init resolved (a checkpoint dir, a training workdir, a HF
dir, 'preset:NAME' or 'scratch') and the network and tokenizer stored there. The plan
(train/plan.py) is derived from this; the weights are read into the plan by train/state.py.
"""
from __future__ import annotations

import dataclasses
import os

from data.errors import UserError
from data.tokenizer import load_tokenizer
from vlm import checkpoint, hf
from vlm.config import VLMConfig, preset


def resolve_init(init: str) -> str:
  """'scratch' and 'preset:NAME' as they are; a path as serve.workdir.resolve reads it: a stage-1
  workdir stands for its final checkpoint (`WORKDIR/final`), an unfinished one is an error. A path
  that does not exist is kept (check_init reports it; plan() falls back to model.preset)."""
  if init == "scratch" or init.startswith("preset:") or not os.path.exists(init):
    return init
  from serve import workdir
  return workdir.resolve(init)


def check_init(config):
  """model.init exists: a missing directory is reported as such, before a tokenizer or a config
  is looked for in it (plan() alone falls back to model.preset for dry runs)."""
  init = config.model.init
  if not init:
    raise UserError("model.init is empty: set it to a checkpoint dir, a training workdir, a HF "
                    "model dir, 'preset:NAME' or 'scratch'")
  if init == "scratch" or init.startswith("preset:"):
    return
  if not os.path.exists(init):
    raise UserError(f"model.init: directory not found ({init}); train the stage it starts from "
                    "first, or point --config.model.init at a checkpoint")
  resolve_init(init)   # a workdir whose run has not finished says so


def tokenizer_dir(config) -> str:
  """data.tokenizer_dir, else the tokenizer that ships with the source checkpoint."""
  if config.data.tokenizer_dir:
    return config.data.tokenizer_dir
  init = resolve_init(config.model.init)
  for d in (os.path.join(init, "tokenizer"), init):
    if os.path.exists(os.path.join(d, "tokenizer_config.json")):
      return d
  raise UserError(f"no tokenizer: set data.tokenizer_dir (model.init {init!r} has none)")


def source_config(config) -> VLMConfig:
  """The network as stored at model.init (no training overrides)."""
  m = config.model
  init = resolve_init(m.init)
  if init == "scratch":
    arch = VLMConfig.from_dict(m.arch.to_dict() if hasattr(m.arch, "to_dict") else dict(m.arch))
    if arch.llm.vocab_size <= 0 or arch.image_token_id < 0:   # take them from the tokenizer
      tok = load_tokenizer(tokenizer_dir(config))
      vocab = arch.llm.vocab_size if arch.llm.vocab_size > 0 else len(tok)
      image = (arch.image_token_id if arch.image_token_id >= 0 else
               tok.convert_tokens_to_ids("<image>"))
      arch = arch.replace(llm=dataclasses.replace(arch.llm, vocab_size=vocab), image_token_id=image)
    return arch
  if init.startswith("preset:"):
    return preset(init.split(":", 1)[1])
  if checkpoint.is_checkpoint(init):
    return checkpoint.load_config(init)
  if hf.is_hf_dir(init):
    return hf.dir_config(init)   # as vlm.from_pretrained reads it, prompt format included
  if m.get("preset"):   # the source is not here (e.g. a dry run): plan from the named shape
    return preset(m.preset)
  raise FileNotFoundError(f"model.init {m.init!r}: not a checkpoint dir, HF dir, 'preset:NAME' "
                          "or 'scratch'")
