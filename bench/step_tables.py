"""bench.train_step's markdown tables: the case table (ours against the reference), the ablation
table and the XLA flag A/B table, each under the same device / versions / command header."""
from __future__ import annotations

import datetime

from bench.env import device, versions
from bench.step_cases import CASES


def _versions() -> str:
  return versions('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'peft')


def _head(title, args, rows, argv, settings, where=None) -> list:
  """The title ("{case}": the rows' case) and the device / versions / date / command / shape
  lines every table here starts with. The device is the one a child reported: the parent never
  starts a GPU backend (JAX would preallocate the memory the children need)."""
  where = where or next((r["device"] for r in rows if "device" in r), "?")
  title = title.format(case=CASES[rows[0]["case"] if rows else args.cases[0]])
  return [f"## {title} ({'smoke, CPU' if args.smoke else 'GPU'})", "", f"- device: {where}",
          f"- versions: {_versions()}", f"- date: {datetime.date.today().isoformat()}",
          f"- command: `{' '.join(['python -m bench.train_step'] + argv)}`",
          f"- shape: {_shape(args)}; {settings}"]


def table(args, rows, argv) -> str:
  lines = _head("Training-step benchmark", args, rows, argv,
                f"ours: remat {args.remat}, attention {args.attention}, loss chunk "
                f"{args.loss_chunk}, frozen weights {args.frozen_dtype or args.dtype}; LoRA "
                f"r={args.lora_rank} alpha={args.lora_alpha:g} dropout {args.lora_dropout:g}; "
                f"mean of {args.steps} steps after {args.warmup} warm-up; FLOPs: 6N per LLM "
                "token, 6N per connector feature, 2N per frozen tower token (module docstring); "
                f"MFU vs {args.peak_tflops:g} TFLOP/s", device() if args.smoke else None) + ["",
           "| case | side | step s | first step s | tokens/s | images/s | TFLOP/s | MFU | peak GB "
           "| loss | ours / reference | note |", "|---" * 12 + "|"]
  for r in rows:
    name = CASES[r["case"]]
    if "step_s" not in r:
      lines.append(f"| {name} | {r['side']} | - | - | - | - | - | - | - | - | - | "
                   f"{r.get('note', '')} |")
      continue
    dt = r["step_s"]
    tf = r["flops"] / dt / 1e12
    ratio = ""
    if r["side"] == "ours":
      ref = next((x for x in rows if x["case"] == r["case"] and x["side"] == "reference"
                  and "step_s" in x), None)
      ratio = f"{ref['step_s'] / dt:.2f}x" if ref else "-"
    fmt = lambda x, f: "-" if not x else format(x, f)
    lines.append(f"| {name} | {r['side']} | {dt:.4f} | {r['first_s']:.1f} | "
                 f"{fmt(r['tokens'] / dt, ',.0f')} | {fmt(r['images'] / dt, '.2f')} | {tf:.3g} | "
                 f"{100 * tf / args.peak_tflops:.1f}% | {_peak(r)} | {_loss(r)} | {ratio} | "
                 f"{r.get('note', '')} |")
  for r in rows:
    prof = r.get("profile")
    if prof:
      lines += ["", f"### Profile: {CASES[r['case']]}, {r['side']}", "", "```",
                prof.get("text") or prof.get("note", ""), "```"]
  return "\n".join(lines)


def _loss(r) -> str:
  return "-" if r.get("loss") is None else f"{r['loss']:.3f}"


def _peak(r) -> str:
  return f"{r['peak'] / 2 ** 30:.1f}" if r.get("peak") else "-"


def _against(r, base) -> list:
  """Cells compile s, step s, tokens/s and step time against `base` of one variant's row."""
  dt = r["step_s"]
  return [f"{r['compile_s']:.1f}", f"{dt:.4f}",
          f"{r['tokens'] / dt:,.0f}" if r.get("tokens") else "-", f"{dt / base['step_s']:.2f}x"]


def _shape(args) -> str:
  depth = f", {args.layers} decoder layers (reduced depth, same widths)" if args.layers else ""
  return (f"{'smoke' if args.smoke else args.preset}{depth}, micro-batch {args.micro_batch}, "
          f"sequence {args.seq}, {args.dtype}")


def ablation_table(args, rows, argv) -> str:
  """Markdown: one row per variant, step time against the base variant (the first row)."""
  lines = _head("Training-step ablations, {case}, ours", args, rows, argv,
                f"LoRA r={args.lora_rank} alpha={args.lora_alpha:g}; mean of {args.steps} steps "
                f"after {args.warmup} warm-up; every variant its own compiled step in one "
                f"process, all compiled before any was timed ({args.compile_threads} at a time), "
                "same weights and batch; memory is XLA's compiled memory analysis (arguments + "
                "temporaries; the process peak spans all variants)") + [
           "- at reduced depth the LM head and loss are a larger share of the step than with "
           "32 layers, so the loss-chunk effect is magnified and per-layer effects (remat, "
           "attention) are diluted", "",
           "| variant | remat | attention | loss chunk | frozen weights | compile s | step s "
           "| tokens/s | step time vs first row | args GB | temp GB | loss | note |",
           "|---" * 13 + "|"]
  base = next((r for r in rows if "step_s" in r), None)
  gb = lambda r, k: f"{r[k] / 2 ** 30:.3g}" if r.get(k) is not None else "-"
  for r in rows:
    st = r.get("settings", {})
    cells = [r["variant"], st.get("remat", "?"), st.get("attention", "?"),
             str(st.get("loss_chunk", "?")), st.get("frozen_dtype", "?")]
    if "step_s" in r:
      cells += _against(r, base) + [gb(r, "compiled_args"), gb(r, "compiled_temp"), _loss(r)]
    else:
      cells += ["-"] * 7
    lines.append("| " + " | ".join(cells + [r.get("note", "")]) + " |")
  return "\n".join(lines)


def xla_flags_table(args, rows, argv) -> str:
  """Markdown: one row per flag set, step time against the first set that ran."""
  lines = _head("XLA flag A/B, {case}, ours", args, rows, argv,
                f"remat {args.remat}, attention {args.attention}, loss chunk {args.loss_chunk}; "
                "each flag set in its own process with its own compile (JAX's compilation cache "
                f"keys on XLA_FLAGS); mean of {args.steps} steps after {args.warmup} warm-up; "
                "peak is the process's") + ["",
      "| flag set | XLA_FLAGS | compile s | step s | tokens/s | step time vs first row | peak GB "
      "| loss | note |", "|---" * 9 + "|"]
  base = next((r for r in rows if "step_s" in r), None)
  for r in rows:
    cells = [r["variant"], f"`{r['xla_flags']}`" if r["xla_flags"] else "(none)"]
    if "step_s" in r:
      cells += _against(r, base) + [_peak(r), _loss(r)]
    else:
      cells += ["-"] * 6
    lines.append("| " + " | ".join(cells + [r.get("note", "").replace("|", "/")]) + " |")
  return "\n".join(lines)
