"""The record files evaluation reads: rows indexed by id, answer files ({question_id, text}, as
`evaluation.vqa run` writes them), LLaVA-Med ground truth, and the check that answers and truth
hold the same ids. Shared by evaluation.vqa, vqa_run, report and judge."""
from __future__ import annotations

from data.errors import BadSample
from data.jsonfile import read_records
from evaluation import vqa_metrics

_SHOWN_IDS = 20


def _field(row: dict, keys: tuple, path: str, n: int):
  for k in keys:
    if k in row:
      return row[k]
  raise BadSample("missing_field", f"record {n} has none of {list(keys)}", path=path)


def index_by_id(rows: list, keys: tuple, path: str) -> dict:
  """{str(id): row}; ids compared as strings so 5 and "5" agree; duplicates are errors."""
  out = {}
  for n, row in enumerate(rows, 1):
    key = str(_field(row, keys, path, n))
    if key in out:
      raise BadSample("duplicate_id", f"id {key!r} appears twice", sample_id=key, path=path)
    out[key] = row
  return out


def read_by_id(path: str, keys: tuple = ("id", "question_id")) -> dict:
  """The records of a JSON list or JSONL file as {str(id): row}, the id under the first of `keys`."""
  return index_by_id(read_records(path), keys, path)


def read_answers(path: str) -> dict:
  """Answer JSONL -> {str(question_id): text}."""
  rows = read_by_id(path, ("question_id",))
  out = {}
  for key, row in rows.items():
    text = row.get("text")
    if not isinstance(text, str):
      raise BadSample("missing_field", "answer has no string 'text'", sample_id=key, path=path)
    out[key] = text
  return out


def check_same_ids(gt_ids, pred_ids, gt_path: str, pred_path: str) -> None:
  """Raise, listing what is missing and extra, unless both files hold the same ids."""
  missing = sorted(set(gt_ids) - set(pred_ids))
  extra = sorted(set(pred_ids) - set(gt_ids))
  if not missing and not extra:
    return
  msg = []
  for what, ids in (("missing from the answers", missing), ("not in the ground truth", extra)):
    if ids:
      more = f" (+{len(ids) - _SHOWN_IDS} more)" if len(ids) > _SHOWN_IDS else ""
      msg.append(f"{len(ids)} ids {what}: {', '.join(ids[:_SHOWN_IDS])}{more}")
  raise BadSample("id_mismatch", f"answers {pred_path} do not match ground truth {gt_path}: "
                  + "; ".join(msg), path=pred_path)


def gt_answer(row: dict, key: str, path: str) -> tuple:
  """(answer_type, answer text) of one LLaVA-Med test.json entry."""
  conv = row.get("conversations", row.get("conversatons"))
  turn = conv[1] if isinstance(conv, list) and len(conv) > 1 else None
  if (not isinstance(turn, dict) or turn.get("from") != "gpt"
      or not isinstance(turn.get("value"), str)):
    raise BadSample("malformed_sample", "expected conversations[1] to be the gpt answer",
                    sample_id=key, path=path)
  kind = str(row.get("answer_type", "")).upper()
  if kind not in (vqa_metrics.OPEN, vqa_metrics.CLOSED):
    raise BadSample("malformed_sample", f"answer_type must be OPEN or CLOSED, got "
                    f"{row.get('answer_type')!r}", sample_id=key, path=path)
  return kind, turn["value"]
