"""`python -m train.validate`: a whole data set checked as training reads it. The oracle is the
training iterator itself (data.pipeline.make_iterator): the same bad samples per reason, the same
usable samples at the same (cut) lengths. Configs are taken as train.main takes them: a chained
config whose second stage starts from the first one's (untrained) workdir, --stage, overrides."""
import dataclasses
import json
import os

import pytest
from PIL import Image

from train import validate
from data.conversation import encode
from data.pipeline import make_iterator
from tiny_tokenizers import llama3_tokenizer, load

MAX_LEN = 40
Q, A = "What is shown in the image?", "The chest X-ray shows a nodule."
LONG_A = " ".join(["The lesion shows a nodule."] * 8)   # kept, cut to MAX_LEN
LONG_Q = " ".join(["Is there a fracture?"] * 12)        # nothing trained fits: too_long


def _row(i, image="img/ok.png", q=Q, a=A, **kw):
  return {"id": f"s{i}", "image": image,
          "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                            {"from": "gpt", "value": a}], **kw}


CONFIG = """
from configs import common, demo

def stage(paths, template, max_len):
  c = common.base()
  c.model.update(dtype="float32", frozen_dtype="", remat="none", attention="xla")
  c.data.update(paths=paths, image_root={root!r}, tokenizer_dir={tok!r}, template=template,
                max_len=max_len, global_batch=2, read_threads=1)
  return c

def get_config():
  c = common.base()
  c.name = "tiny_chain"
  c.chain = ("align", "tune")
  c.align = stage(({caps!r},), "plain", 48)
  c.align.model.init, c.align.model.arch = "scratch", demo.ARCH
  c.tune = stage(({train!r},), "llama3", {max_len})
  c.tune.model.init = "{{workdir}}/align"    # not trained yet: its network is align's
  c.tune.eval.paths = ({eval!r},)
  return c
"""


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  d = tmp_path_factory.mktemp("validate")
  tok = llama3_tokenizer(d)
  (d / "img").mkdir()
  Image.new("RGB", (30, 20), (200, 40, 40)).save(d / "img" / "ok.png")
  (d / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  (d / "outside.png").write_bytes((d / "img" / "ok.png").read_bytes())
  rows = [_row(0), _row(1, a=LONG_A), _row(2, q=LONG_Q), _row(3, image="img/missing.png"),
          _row(4, image="../outside.png"), _row(5, image="img/corrupt.png"), _row(6),
          {"id": "s7", "conversations": [{"from": "human", "value": Q}]}, _row(8), _row(9)]
  lines = [json.dumps(r) for r in rows]
  lines.insert(5, '{"id": "broken", "image": ')   # line 6 of the file
  (d / "train.jsonl").write_text("\n".join(lines) + "\n")
  (d / "eval.json").write_text(json.dumps([_row(10), _row(11)]))
  caps = [{"id": f"c{i}", "image": "img/ok.png", "conversations": [
      {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A chest X-ray."}]}
      for i in range(3)]
  (d / "caps.json").write_text(json.dumps(caps))
  cfg = d / "chain.py"
  cfg.write_text(CONFIG.format(root=str(d), tok=tok, caps=str(d / "caps.json"),
                               train=str(d / "train.jsonl"), eval=str(d / "eval.json"),
                               max_len=MAX_LEN))
  return d, str(cfg), rows, tok


def test_counts_and_lengths_are_what_training_sees(case):
  d, cfg, rows, tok = case
  config, workdir = validate.load_config(cfg, [], str(d / "run"))
  assert config.tune.model.init == os.path.join(workdir, "align")
  [(name, dcfg), (eval_name, _)] = validate.data_sets(config, "tune", workdir)
  assert (name, eval_name) == ("tune train", "tune eval")
  rep = validate.scan(dcfg, name, threads=2)

  # The training iterator over the same files, one sample a batch, in file order.
  it = make_iterator(dataclasses.replace(dcfg, per_process_batch=1, shuffle=False))
  batches = list(it)
  assert rep.skipped == it._skips.counts == {
      "too_long": 1, "missing_image": 1, "path_escape": 1, "corrupt_image": 1, "one_sided": 1,
      "malformed": 1}
  assert rep.samples == 11 and rep.usable == len(batches) == 5
  trained = sorted(int((b["segment_ids"] > 0).sum()) for b in batches)
  assert sorted(min(n, MAX_LEN) for n in rep.lengths) == trained
  # lengths are before the cut: the long answer is over max_len, and is kept (cut)
  full = encode(rows[1], load(tok), "llama3", image_tokens=dcfg.geometry.image_tokens,
                image_token_id=dcfg.image_token_id)
  assert len(full["input_ids"]) > MAX_LEN and len(full["input_ids"]) in rep.lengths
  assert rep.over_kept == 1 and len(rep.too_long) == 1 and not rep.failed()
  [(_, malformed)] = rep.examples["malformed"]
  assert "line 6 column" in malformed and str(d / "train.jsonl") in malformed


def test_command_line_report_and_exit_status(case, capsys):
  d, cfg, _, _ = case
  argv = ["--config", cfg, "--workdir", str(d / "run"), "--threads", "2"]
  assert validate.main(argv) == 0
  out = capsys.readouterr().out
  for name in ("align train", "tune train", "tune eval"):
    assert f"== {name}:" in out
  assert "== tune train: 11 samples, 5 usable, 6 bad (lenient: training skips them)" in out
  assert "  too_long: 1\n" in out
  assert f"({d / 'train.jsonl'}, sample 's3')" in out   # the example names file and sample
  assert f"2 samples exceed max_len {MAX_LEN}: 1 cut to it, 1 skipped as too_long" in out
  # strict mode (training would stop at the first bad sample) exits 1; --stage picks the stage
  assert validate.main(argv + ["--stage", "tune", "--strict"]) == 1
  out = capsys.readouterr().out
  assert "align" not in out and "(strict: training stops at the first)" in out
  # an override reaches the stage: another image root leaves every image missing
  empty = d / "empty"
  empty.mkdir(exist_ok=True)
  assert validate.main(argv + ["--stage", "tune", f"--config.tune.data.image_root={empty}",
                               "--config.tune.data.strict=True"]) == 1
  assert "missing_image: 7" in capsys.readouterr().out   # and the corrupt one


@pytest.mark.parametrize("extra, message", [
    (["--config.tune.data.nope=1"], "chain.py has no field 'nope'"),
    (["--config.tune.data.max_len=many"], "max_len=many"),
    (["--stage", "nope"], "--stage ['nope']: tiny_chain has stages ['align', 'tune']"),
])
def test_bad_command_lines_are_one_line(case, capsys, extra, message):
  d, cfg, _, _ = case
  with pytest.raises(SystemExit) as e:
    validate.main(["--config", cfg, "--workdir", str(d / "run"), *extra])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
  assert message in err


def test_missing_config_file_is_one_line(capsys):
  with pytest.raises(SystemExit):
    validate.main(["--config", "no_such_config.py"])
  assert capsys.readouterr().err.strip() == (
      "error: config file not found: no_such_config.py (looked in the current dir and configs/)")


def test_histogram_bins():
  lines = validate.histogram([1, 5, 5, 8, 9, 20], 8)
  assert [ln.split()[:2] for ln in lines] == [["1-1", "1"], ["2-2", "0"], ["3-3", "0"],
                                              ["4-4", "0"], ["5-5", "2"], ["6-6", "0"],
                                              ["7-7", "0"], ["8-8", "1"], [">", "8"]]
  assert lines[-1].split()[2] == "2" and lines[4].endswith("#" * 40)


@pytest.mark.slow
def test_demo_config(tmp_path, capsys):
  """configs/demo.py as it is, data written by its prepare step."""
  assert validate.main(["--config", "demo.py", "--workdir", str(tmp_path), "--prepare"]) == 0
  out = capsys.readouterr().out
  for name in ("stage1 train", "stage1 eval", "stage2 train", "stage2 eval"):
    assert f"== {name}: " in out
  assert out.count(" 0 bad\n") == 4 and "exceed max_len" in out


def test_says_where_the_skip_guard_would_stop_training(case, tmp_path, capsys):
  """A file with 29% bad samples (20 of 70 images missing): lenient mode skips the odd one, not
  that many. validate replays the bad samples in training's order through training's skip guard
  and names the sample where the run would stop, as the training iterator itself does (the
  oracle: make_iterator over the same data config raises there)."""
  import re
  from data.pipeline import SkipGuardError
  d, _, _, tok = case
  rows = [_row(i, image="img/missing.png" if i % 7 in (2, 5) else "img/ok.png") for i in range(70)]
  (tmp_path / "bad.json").write_text(json.dumps(rows))
  cfg = tmp_path / "bad.py"
  cfg.write_text(CONFIG.format(root=str(d), tok=tok, caps=str(d / "caps.json"),
                               train=str(tmp_path / "bad.json"), eval=str(d / "eval.json"),
                               max_len=MAX_LEN))
  over = ["--config.tune.data.max_skipped_fraction=0.25", "--config.tune.data.skip_check_after=8"]
  argv = ["--config", str(cfg), "--workdir", str(tmp_path / "run"), "--stage", "tune"]
  assert validate.main(argv + over) == 1
  out = capsys.readouterr().out
  assert "== tune train: 70 samples, 50 usable, 20 bad (lenient: too many for training's skip " \
         "guard)" in out
  said = re.search(r"^training would stop at sample (\d+): (lenient mode gave up: .*)$", out, re.M)

  config, workdir = validate.load_config(str(cfg), over, str(tmp_path / "run"))
  [(_, dcfg), _] = validate.data_sets(config, "tune", workdir)
  with pytest.raises(SkipGuardError) as e:
    for _ in make_iterator(dataclasses.replace(dcfg, read_threads=1)):
      pass
  read = int(re.search(r"(\d+) of (\d+) samples were bad", str(e.value)).group(2))
  assert said and int(said.group(1)) == read and said.group(2) == str(e.value), out
  assert 8 <= read < 70
  # the guard's defaults (1% once 200 were read) never judge 70 samples read once
  assert validate.main(argv) == 0
  assert "training would stop" not in capsys.readouterr().out
