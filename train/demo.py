"""`make demo`: the whole pipeline on real biomedical images bundled in installed packages.

1. data: CT / MR (pydicom), fundus and immunohistochemistry (scikit-image) views with captions,
   conversations and a VQA split (data/demo_data.py), and a byte-level BPE tokenizer with the
   Llama-3 special tokens and `<image>`, trained on that text;
2. training: configs/demo.py, stage 1 (connector alignment) then stage 2 (LoRA), on CPU;
3. evaluation: zero-shot VQA with the LLaVA-Med metrics, the answer-quality report, and one
   `serve.chat` answer about the CT image (read from its DICOM file).

  python -m train.demo [--workdir runs/demo]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from data.errors import cli_errors

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
         r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")   # Llama-3's pre-tokenizer


def tokenizer(path: str, texts: list) -> str:
  """Byte-level BPE with Llama-3's split, special tokens and BOS post-processor, plus <image>."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=LLAMA3_SPECIAL, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  bos = LLAMA3_SPECIAL[0]
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                    special_tokens=[(bos, tok.token_to_id(bos))])])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=LLAMA3_SPECIAL[1])
  fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
  fast.save_pretrained(path)
  return path


def prepare(workdir: str, *, train_views: int = 32, test_views: int = 4) -> str:
  """Write DIR/data/{tokenizer, images, stage{1,2}_{train,eval}.json, vqa_test.json} once
  (train_views / test_views views of each of the 5 source images)."""
  from data import demo_data
  root = os.path.join(workdir, "data")
  done = os.path.join(root, "DONE")
  if os.path.exists(done):
    return root
  paths = demo_data.write(root, train_views=train_views, test_views=test_views)
  tokenizer(os.path.join(root, "tokenizer"), demo_data.corpus(paths) + ["user", "assistant", "system"])
  open(done, "w").close()
  return root


QUESTION = "What imaging modality is this?"


def evaluate(workdir: str) -> dict:
  """VQA answers + LLaVA-Med metrics, the answer-quality report and a chat answer on the CT DICOM."""
  from pydicom.data import get_testdata_file
  from evaluation import report, vqa
  from serve import chat
  data, out = os.path.join(workdir, "data"), os.path.join(workdir, "eval")
  ckpt = os.path.join(workdir, "stage2", "final")
  os.makedirs(out, exist_ok=True)
  art = {"checkpoint": ckpt, "answers": os.path.join(out, "vqa_answers.jsonl"),
         "metrics": os.path.join(out, "vqa_metrics.json"), "table": os.path.join(out, "vqa_table.md"),
         "report": os.path.join(out, "report")}
  gt = os.path.join(data, "vqa_test.json")
  vqa.main(["run", "--ckpt", ckpt, "--test-json", gt, "--image-root", data, "--out", art["answers"],
            "--max-new-tokens", "24", "--slots", "16", "--model-id", "demo"])
  vqa.main(["score", "--gt", gt, "--pred", art["answers"], "--out", art["metrics"]])
  vqa.main(["score", "--name", "demo (stage 2, LoRA)", "--table", f"demo={art['metrics']}",
            "--out", art["table"]])
  report.main(["--gt", gt, "--pred", f"demo={art['answers']}", "--out", art["report"]])
  ct = get_testdata_file("CT_small.dcm")
  print(f"\n$ python -m serve.chat --ckpt {ckpt} --image {ct} {QUESTION!r}")
  chat.main(["--ckpt", ckpt, "--image", ct, "--max-new-tokens", "24", QUESTION])
  return art


def main(argv=None):
  ap = argparse.ArgumentParser(description="The demo: tiny model, real bundled biomedical images, "
                               "stage 1 + stage 2 (LoRA), VQA evaluation, report, chat; CPU, minutes.")
  ap.add_argument("--workdir", default="runs/demo", help="where data, checkpoints and logs go")
  args, rest = ap.parse_known_args(argv)
  with cli_errors():   # a full disk or Ctrl-C between the steps: one line too
    _run(args, rest)


def _run(args, rest):
  t0 = time.time()
  from train import main as train_main
  try:  # absl's app.run ends with sys.exit, also on success
    train_main.entry(["train.main", "--config", "demo.py", "--workdir", args.workdir, *rest])
  except SystemExit as e:
    if e.code not in (0, None):
      raise
  art = evaluate(args.workdir)
  w = args.workdir
  print(f"\ndemo finished in {time.time() - t0:.0f} s. Artifacts:")
  for k, v in [("data + tokenizer", os.path.join(w, "data")),
               ("stage 1 run (metrics.jsonl, tensorboard/, checkpoints/)", os.path.join(w, "stage1")),
               ("stage 2 run", os.path.join(w, "stage2")), *art.items()]:
    print(f"  {k:55s} {v}")
  print(f"\nChat with it in a browser: `make serve` or `python -m serve --ckpt {w} --image-root "
        f"{os.path.join(w, 'data')}`, then open http://127.0.0.1:8000/")


if __name__ == "__main__":
  main(sys.argv[1:])
