"""serve.workdir.resolve: what a --ckpt path stands for, laid out as train.main writes a workdir
(WORKDIR/final; a chained config's WORKDIR/<stage>/final; WORKDIR/checkpoints/<step> while it
runs). No model is loaded: only the directory layout matters."""
import json

import pytest

from data.errors import UserError
from serve.workdir import resolve


def _ckpt(path):
  (path / "params").mkdir(parents=True)
  (path / "config.json").write_text("{}")
  return str(path)


def _stage(work, name, init, final=True, steps=()):
  d = work / name
  d.mkdir(parents=True)
  (d / "train_config.json").write_text(json.dumps({"name": name, "model": {"init": init}}))
  for s in steps:
    (d / "checkpoints" / str(s)).mkdir(parents=True)
  if final:
    _ckpt(d / "final")
  return d


def test_models_as_given(tmp_path):
  ck = _ckpt(tmp_path / "ck")
  assert resolve(ck) == ck
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  assert resolve(tmp_path / "hf") == str(tmp_path / "hf")


def test_workdirs(tmp_path):
  one = tmp_path / "one"
  one.mkdir()
  (one / "train_config.json").write_text("{}")
  _ckpt(one / "final")
  assert resolve(one) == str(one / "final")
  # chained: the last stage is the one no other stage starts from, whatever the names sort to
  chain = tmp_path / "chain"
  _stage(chain, "b_align", "scratch")
  _stage(chain, "a_tune", str(chain / "b_align"))
  assert resolve(chain) == str(chain / "a_tune" / "final")


def test_unfinished_and_unknown(tmp_path):
  chain = tmp_path / "chain"
  _stage(chain, "stage1", "scratch")
  _stage(chain, "stage2", str(chain / "stage1" / "final"), final=False, steps=(40, 120))
  with pytest.raises(UserError, match=r"its last stage 'stage2' has not finished \(no "
                     r".*stage2/final; its newest train checkpoint, step 120, .*rerun"):
    resolve(chain)
  with pytest.raises(UserError, match="no such checkpoint dir or training workdir"):
    resolve(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="neither a checkpoint of this project"):
    resolve(tmp_path / "empty")
