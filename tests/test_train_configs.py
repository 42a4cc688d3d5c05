"""Paper configs (configs/*.py): full-size state planned with jax.eval_shape (nothing allocated),
hyperparameters against the papers' tables, the optimizer against torch's AdamW + HF's cosine
schedule, MFU FLOPs, and the command line's config lookup."""
import importlib
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from train import metrics, optimizer
from train import plan as plan_lib
from train import state as state_lib
from train.main import fill_workdir, resolve_config_arg
from vlm.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPERS = os.path.join(os.path.dirname(ROOT), "shared", "papers")
PAPER_CONFIGS = ("stage1", "stage2", "stage2_lora", "ldrt_llava15_lora", "ldrt_llava16_lora")

# Transcribed from the papers (file, table / section):
#   Llama3-Med (llama3-med_arxiv-2406.09454.md) Table 8 (pretraining) and Table 9 (finetuning);
#   Sec. 4 "Implementation details": cosine scheduler, AdamW.
#   LDRT (ldrt-llava-lora_arxiv-2501.15370.md) Sec. 4: batch 16, lr 2e-4 cosine, LoRA r=128
#   alpha=256 (vision module and base model), projector lr 2e-5, 3% warmup, 2048 tokens, 1 epoch.
PAPER = {
    "stage1": dict(global_batch=256, lr=1e-3, epochs=1, max_len=2048, weight_decay=0.0,
                   warmup_ratio=0.03, schedule="cosine"),
    "stage2": dict(global_batch=128, lr=2e-5, epochs=1, max_len=2048, weight_decay=0.0,
                   warmup_ratio=0.03, schedule="cosine"),
    "stage2_lora": dict(global_batch=128, lr=2e-4, projector_lr=2e-5, epochs=1, max_len=2048,
                        weight_decay=0.0, warmup_ratio=0.03, schedule="cosine", rank=128,
                        alpha=256),
    "ldrt_llava15_lora": dict(global_batch=16, lr=2e-4, projector_lr=2e-5, epochs=1, max_len=2048,
                              warmup_ratio=0.03, schedule="cosine", rank=128, alpha=256,
                              vision_lora=True),
    "ldrt_llava16_lora": dict(global_batch=16, lr=2e-4, projector_lr=2e-5, epochs=1, max_len=2048,
                              warmup_ratio=0.03, schedule="cosine", rank=128, alpha=256,
                              vision_lora=True),
}
# The prompt format each config trains in and its final checkpoint records (template, image
# position, system prompt), from the reference code: Llama3-Med llama3med/data/template/
# llama3_template.py (system string) + base.py (<image> left in place); LLaVA llava/train/train.py
# preprocess_multimodal (image first) with conv_vicuna_v1 (its own system: None = the template's).
# Stage 1 trains in `plain` and keeps the model's format (the llama3_med preset's).
LLAMA3_MED_FORMAT = ("llama3", "keep", "You are a helpful language and vision assistant. ")
FORMATS = {"stage1": LLAMA3_MED_FORMAT, "stage2": LLAMA3_MED_FORMAT,
           "stage2_lora": LLAMA3_MED_FORMAT, "ldrt_llava15_lora": ("vicuna_v1", "first", None),
           "ldrt_llava16_lora": ("vicuna_v1", "first_next", None)}
LLAMA3_8B_PARAMS = 8_030_261_248      # Meta-Llama-3-8B(-Instruct)
LLAMA_13B_PARAMS = 13_015_864_320     # LLaMA / Vicuna-13B
LLAMA3_8B_LORA_R128 = 335_544_320     # peft, r=128 on q,k,v,o,gate,up,down of Llama-3-8B


def load(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_hyperparameters_match_the_papers(name):
  c, want = load(name), PAPER[name]
  got = dict(global_batch=c.data.global_batch, lr=c.optim.lr, epochs=c.train.epochs,
             max_len=c.data.max_len, weight_decay=c.optim.weight_decay,
             warmup_ratio=c.optim.warmup_ratio, schedule=c.optim.schedule)
  if "projector_lr" in want:
    got["projector_lr"] = c.optim.groups.connector.lr
    assert re.search(c.optim.groups.connector.pattern, "connector/fc0/kernel")
  if "rank" in want:
    got.update(rank=c.model.lora.rank, alpha=c.model.lora.alpha)
    assert set(c.model.lora.targets) == {"q", "k", "v", "o", "gate", "up", "down"}
  if "vision_lora" in want:
    got["vision_lora"] = bool(c.model.lora.vision_targets)
  assert got == {k: want.get(k, got[k]) for k in got} and set(want) <= set(got)
  assert c.data.global_batch % c.optim.grad_accum == 0


def _paper(name):
  path = os.path.join(PAPERS, name)
  if not os.path.exists(path):
    pytest.skip(f"{path} not on this machine")
  with open(path) as f:
    return f.read()


def test_transcription_matches_the_paper_texts():
  text = _paper("llama3-med_arxiv-2406.09454.md")
  for table, stage in (("Table 8", "stage1"), ("Table 9", "stage2")):
    block = text[:text.index(f"{table}:")].rsplit("Hyperparameter", 1)[1]
    rows = dict(line.split("\t") for line in block.strip().splitlines() if "\t" in line)
    want = PAPER[stage]
    assert int(rows["Global Batch Size"]) == want["global_batch"]
    assert float(rows["Learning Rate"]) == want["lr"]
    assert int(rows["Epochs"]) == want["epochs"]
    assert int(rows["Max Length"]) == want["max_len"]
    assert float(rows["Weight Decay"]) == want["weight_decay"]
    assert float(rows["Warmup Ratio"]) == want["warmup_ratio"]
  ldrt = _paper("ldrt-llava-lora_arxiv-2501.15370.md")
  sec4 = ldrt[ldrt.index("4. EXPERIMENT AND RESULT"):]
  for phrase in ("1 epoch", "batch size of 16", "learning rate of $2e-4$ with cosine decay",
                 "r=128", r"\alpha=256", "learning rate of $2e-5$", "3% warmup",
                 "2048 tokens", "both the vision module and the base model"):
    assert phrase in sec4, phrase


def _count(tree, pred=lambda path: True):
  return sum(math.prod(v.shape) for k, v in flatten_dict(tree).items() if pred("/".join(k)))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_plans_full_size_state_without_allocating(name):
  c = load(name)
  assert not os.path.exists(c.model.init)   # planned from model.preset, as on a laptop
  before = sum(x.nbytes for x in jax.live_arrays())
  mesh = make_mesh(tuple(c.mesh.shape))
  plan = plan_lib.plan(c, mesh, total_steps=1000)
  st, frozen = plan_lib.abstract_state(plan)
  assert sum(x.nbytes for x in jax.live_arrays()) - before < 1 << 20   # nothing big allocated
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves((st, frozen)))

  trainable = flatten_dict(st["trainable"])
  assert all(x.dtype == np.float32 for x in trainable.values())
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree_util.tree_leaves(frozen))
  paths = {"/".join(k) for k in trainable}
  llm = _count(plan.abstract, lambda p: p.startswith("llm/") and "lora_" not in p)
  if name.startswith("stage"):
    assert llm == LLAMA3_8B_PARAMS + 2 * 4096   # + the <image> row of embed and lm_head
  else:
    assert llm == LLAMA_13B_PARAMS + 2 * 64 * 5120   # llava-hf pads the vocabulary to 32064
  if name == "stage1":
    assert paths and all(p.startswith("connector/") for p in paths)
  elif name == "stage2":
    assert {p.split("/")[0] for p in paths} == {"connector", "llm"}
    assert not any(p.startswith("vision/") for p in paths)
  else:
    assert all(p.startswith("connector/") or p.endswith(("lora_a", "lora_b")) for p in paths)
    adapters = _count(st["trainable"], lambda p: p.startswith("llm/"))
    if name == "stage2_lora":
      assert adapters == LLAMA3_8B_LORA_R128
    assert any(p.startswith("vision/") for p in paths) == name.startswith("ldrt")
  # the final checkpoint records the prompt format the data was rendered in
  from data.pipeline import DataConfig
  data = DataConfig.from_model(plan.config, **{k: v for k, v in c.data.to_dict().items()
                                               if v is not None and k != "tokenizer_dir"})
  out = state_lib.export_config(plan, data)
  assert (out.template, out.image_position, out.system) == FORMATS[name]
  # the optimizer state is sharded like its parameters, and parameters are sharded
  mu = flatten_dict(optax.tree_utils.tree_get(st["opt"], "mu"))
  assert mu.keys() == trainable.keys()
  assert all(mu[k].sharding == trainable[k].sharding for k in trainable)
  # fsdp over 8 devices: each device holds about an eighth of the whole state
  leaves = jax.tree_util.tree_leaves((st, frozen))
  total = sum(x.size * x.dtype.itemsize for x in leaves)
  per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
  assert per_device < 1.25 * total / 8


def group_summary(optim, params) -> dict:
  """{lr: number of parameters}, from optimizer.lr_scales."""
  out = {}
  for s, p in zip(jax.tree_util.tree_leaves(optimizer.lr_scales(optim, params)),
                  jax.tree_util.tree_leaves(params)):
    lr = optim.lr * s
    out[lr] = out.get(lr, 0) + int(math.prod(p.shape))
  return out


def test_schedule_and_adamw_match_torch_and_hf():
  torch = pytest.importorskip("torch")
  from transformers import get_cosine_schedule_with_warmup
  import ml_collections
  optim = ml_collections.ConfigDict(dict(
      lr=1e-2, groups={"connector": {"pattern": r"^connector/", "lr": 2e-3}}, schedule="cosine",
      warmup_ratio=0.25, min_lr_ratio=0.0, weight_decay=0.1, no_decay=(r"bias$",),
      b1=0.9, b2=0.999, eps=1e-8, clip_norm=0.5, grad_accum=1))
  rng = np.random.default_rng(0)
  params = {"connector": {"fc0": {"kernel": rng.standard_normal((3, 4)).astype(np.float32),
                                  "bias": rng.standard_normal(4).astype(np.float32)}},
            "llm": {"w": rng.standard_normal((4, 2)).astype(np.float32)}}
  steps = 8
  tx, sched = optimizer.make(optim, steps, params)
  # HF: warm-up ceil(0.25 * 8) = 2 steps from 0, then half a cosine to 0
  np.testing.assert_allclose([float(sched(i)) for i in range(steps)],
                             [0.0, 5e-3] + [1e-2 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 6))
                                            for i in range(2, steps)], rtol=1e-6, atol=1e-9)
  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in
        (("k", params["connector"]["fc0"]["kernel"]), ("b", params["connector"]["fc0"]["bias"]),
         ("w", params["llm"]["w"]))}
  opt = torch.optim.AdamW([{"params": [tp["k"]], "lr": 2e-3, "weight_decay": 0.1},
                           {"params": [tp["b"]], "lr": 2e-3, "weight_decay": 0.0},
                           {"params": [tp["w"]], "lr": 1e-2, "weight_decay": 0.1}],
                          betas=(0.9, 0.999), eps=1e-8)
  lr_sched = get_cosine_schedule_with_warmup(opt, 2, steps)
  state, p = tx.init(params), params
  for _ in range(steps):
    g = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    tp["k"].grad = torch.tensor(g["connector"]["fc0"]["kernel"])
    tp["b"].grad = torch.tensor(g["connector"]["fc0"]["bias"])
    tp["w"].grad = torch.tensor(g["llm"]["w"])
    torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.5)
    opt.step()
    lr_sched.step()
  np.testing.assert_allclose(p["connector"]["fc0"]["kernel"], tp["k"].detach().numpy(), atol=1e-6)
  np.testing.assert_allclose(p["connector"]["fc0"]["bias"], tp["b"].detach().numpy(), atol=1e-6)
  np.testing.assert_allclose(p["llm"]["w"], tp["w"].detach().numpy(), atol=1e-6)
  assert group_summary(optim, params) == {2e-3: 16, 1e-2: 8}


def test_flops_follow_the_6n_plus_attention_rule():
  from vlm.config import preset
  from vlm.model import abstract_params
  cfg = preset("llama3_8b")
  params = abstract_params(cfg, boxed=False)
  mask = jax.tree_util.tree_map(lambda _: True, params)
  f = metrics.Flops(cfg, params, mask)
  n = sum(math.prod(v.shape) for k, v in flatten_dict(params).items()   # matmul weights
          if len(v.shape) >= 2 and k != ("llm", "embed"))
  c = cfg.llm
  assert f.step(2, 2048, 0) == 2 * 2048 * (6 * n + 12 * c.layers * c.heads * c.head_dim * 2048)
  frozen = metrics.Flops(cfg, params, jax.tree_util.tree_map(lambda _: False, params))
  assert frozen.step(1, 16, 0) == 16 * (2 * n + 4 * c.layers * c.heads * c.head_dim * 16)


def test_bare_config_names_are_looked_up_in_configs(tmp_path):
  argv = resolve_config_arg(["train.main", "--config", "stage2.py", "--config.optim.lr=1e-5"])
  assert argv[2] == os.path.join(ROOT, "configs", "stage2.py")
  argv = resolve_config_arg(["x", "--config=demo.py"])
  assert argv[1] == "--config=" + os.path.join(ROOT, "configs", "demo.py")
  local = tmp_path / "mine.py"
  local.write_text("")
  assert resolve_config_arg(["x", "--config", str(local)])[2] == str(local)
  c = load("demo")
  fill_workdir(c, "/runs/w")
  assert c.stage2.model.init == "/runs/w/stage1"
  assert c.stage1.data.paths == ("/runs/w/data/stage1_train.json",)


def test_command_line_help_and_overrides(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "train.main", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert "--workdir" in out.stdout and "--coordinator_address" in out.stdout   # absl exits 1
  bad = subprocess.run([sys.executable, "-m", "train.main", "--config", "stage2.py",
                        "--config.optim.nope=1"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode != 0 and "nope" in bad.stderr
