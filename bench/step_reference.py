"""The PyTorch reference side of bench.train_step: what the papers' code runs (HF Llama + peft
LoRA, CLIPVisionModel under LLaVA's S2 wrapper, SDPA, non-reentrant checkpointing, autocast bf16,
torch AdamW + grad-norm clipping)."""
from __future__ import annotations

import numpy as np

from bench.step_cases import arch, batch, timed


HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
              "up": "up_proj", "down": "down_proj"}


def _s2_torch(tower, x, scales, tile, grid, layer):
  """LLaVA's S2 wrapper: per scale, bicubic resize, cut tiles, one tower call, stitch, area-pool."""
  import einops
  import torch
  import torch.nn.functional as F
  outs = []
  for s in scales:
    xs = x if s == x.shape[-1] else F.interpolate(x.float(), size=(s, s), mode="bicubic",
                                                  align_corners=False).to(x.dtype)
    k = s // tile
    tiles = einops.rearrange(xs, "n c (i h) (j w) -> (n i j) c h w", i=k, j=k)
    h = tower(tiles, output_hidden_states=True).hidden_states[layer][:, 1:]
    f = einops.rearrange(h, "(n i j) (h w) c -> n c (i h) (j w)", i=k, j=k, h=grid)
    f = F.interpolate(f.float(), size=(grid, grid), mode="area").to(h.dtype)
    outs.append(einops.rearrange(f, "n c h w -> n (h w) c"))
  return torch.cat(outs, -1)


def run_reference(args, case) -> dict:
  import torch
  import transformers as T
  cfg = arch(args, case)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  if not args.smoke and dev != "cuda":
    raise RuntimeError("the reference side needs torch with CUDA")
  low = torch.float32 if args.dtype == "float32" else torch.bfloat16
  torch.manual_seed(0)
  host = batch(args, cfg, case)
  tower = llm = connector = None
  default = torch.get_default_dtype()
  torch.set_default_dtype(low)   # frozen weights made straight in bf16
  try:
    with torch.device(dev):
      if cfg.vision is not None:
        v = cfg.vision
        tower = T.CLIPVisionModel(T.CLIPVisionConfig(
            image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
            intermediate_size=v.mlp_dim, num_hidden_layers=v.layers, num_attention_heads=v.heads,
            hidden_act=v.act, layer_norm_eps=v.norm_eps, attn_implementation="sdpa")).eval()
        tower.requires_grad_(False)
      if case != "vision":
        L = cfg.llm
        llm = T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=L.vocab_size, hidden_size=L.hidden, num_hidden_layers=L.layers,
            num_attention_heads=L.heads, num_key_value_heads=L.kv_heads, head_dim=L.head_dim,
            intermediate_size=L.mlp_dim, rms_norm_eps=L.norm_eps,
            max_position_embeddings=L.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": L.rope_theta},
            tie_word_embeddings=L.tie_embeddings, use_cache=False, attn_implementation="sdpa",
            pad_token_id=0, bos_token_id=None, eos_token_id=None))
        llm.requires_grad_(False)
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  finally:
    torch.set_default_dtype(default)
  params = []
  if case in ("lora", "llm"):
    import peft
    llm = peft.get_peft_model(llm, peft.LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=[HF_TARGETS[t] for t in cfg.lora.targets], task_type="CAUSAL_LM"))
    params += [p for p in llm.parameters() if p.requires_grad]
  if case in ("lora", "stage1"):
    h = cfg.llm.hidden
    connector = torch.nn.Sequential(torch.nn.Linear(cfg.feature_dim, h), torch.nn.GELU(),
                                    torch.nn.Linear(h, h)).to(dev)   # float32 trainable
    params += list(connector.parameters())
  if llm is not None:
    llm.train()
  to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(dev)
  pixels = None
  if "pixel_values" in host:
    v = cfg.vision
    mean, std = (torch.tensor(m, device=dev).view(1, 3, 1, 1) for m in (v.mean, v.std))
    px = to(host["pixel_values"][:, 0]).permute(0, 3, 1, 2).float() / 255.0
    pixels = ((px - mean) / std).to(low)   # what the HF image processor ships
  ids = to(host["input_ids"]).long() if "input_ids" in host else None
  labels = to(host["labels"]).long() if "labels" in host else None
  autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=low != torch.float32)
  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
  s2 = lambda: _s2_torch(tower, pixels, cfg.tiler.scales, cfg.vision.image_size,
                         cfg.vision.grid, cfg.vision.select_layer)
  if case == "vision":
    def fwd(_):
      with torch.no_grad(), autocast:
        return s2()
    first, dt, _ = timed(fwd, None, args.warmup, args.steps, sync)
    return {"first_s": first, "step_s": dt, "peak": _peak_torch(dev), "loss": None}
  opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
  loss_box = []

  def step(_):
    with autocast:
      if case == "llm":
        loss = llm(input_ids=ids, labels=labels).loss
      else:
        with torch.no_grad():
          feats = s2()
        emb = llm.get_input_embeddings()(ids)
        feats = connector(feats.to(connector[0].weight.dtype))
        emb = emb.masked_scatter((ids == cfg.image_token_id)[..., None], feats.to(emb.dtype))
        loss = llm(inputs_embeds=emb, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss_box[:] = [loss.detach()]
  first, dt, _ = timed(step, None, args.warmup, args.steps, sync)
  return {"first_s": first, "step_s": dt, "peak": _peak_torch(dev),
          "loss": float(loss_box[0].float())}


def _peak_torch(dev):
  import torch
  return torch.cuda.max_memory_allocated() if dev == "cuda" else None
