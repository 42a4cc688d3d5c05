"""The grain training pipeline (data/sources.py, data/packing.py, data/pipeline.py): sharding,
exact state restore, padding and packing layouts, bad-input accounting, sources, placement."""
import dataclasses
import io
import json
import logging
import os
import re

import grain.python as gp
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from PIL import Image
from tiny_tokenizers import LLAMA3_SPECIAL, llama3_tokenizer, load

from data.conversation import encode
from data.errors import BadSample
from data.image import ImageGeometry
from data.pipeline import DataConfig, SkipGuardError, make_iterator, to_global
from data.sources import ArrayRecordSource, JsonSource, json_index

IMG_ID, IMG_TOKENS, SIDE = 1000, 3, 8
GEOMETRY = ImageGeometry(tiler="single", image_size=SIDE, resize_mode="squash",
                         image_tokens=IMG_TOKENS)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return llama3_tokenizer(tmp_path_factory.mktemp("tok"))


def colour(i):
  return (i * 37 % 256, i * 11 % 256, 255 - i)


def sample(i, image=True):
  """A distinct one- or two-turn sample; the i-th image is a solid colour."""
  q = f"Case {i}: " + " ".join(["is the heart enlarged?"] * (1 + i % 4))
  conv = [{"from": "human", "value": ("<image>\n" if image else "") + q},
          {"from": "gpt", "value": "No, it is not. " * (1 + i % 3)}]
  if i % 5 == 0:
    conv += [{"from": "human", "value": "Describe the findings."},
             {"from": "gpt", "value": "The slide shows a nodule."}]
  rec = {"id": f"s{i}", "conversations": conv}
  if image:
    rec["image"] = f"img/{i}.png"
  return rec


def write_data(root, recs, name="data.json"):
  """JSON file + solid-colour PNGs for every record that names img/{i}.png."""
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  for r in recs:
    img = r.get("image") if isinstance(r, dict) else None
    if isinstance(img, str) and img.startswith("img/") and img[4:-4].isdigit():
      i = int(img[4:-4])
      Image.new("RGB", (5 + i % 3, 4 + i % 2), colour(i)).save(os.path.join(root, img))
  path = os.path.join(root, name)
  with open(path, "w") as f:
    json.dump(recs, f, ensure_ascii=False)
  return path


def config(path, tok_dir, **kw):
  base = dict(paths=[path], tokenizer_dir=tok_dir, max_len=96, per_process_batch=3, mode="pad",
              geometry=GEOMETRY, image_token_id=IMG_ID, group_window=2, seed=7, read_threads=1)
  return DataConfig(**{**base, **kw})


def reference(recs, tok_dir):
  """{token tuple: (sample index, labels)} from encoding every sample on its own."""
  tok, out = load(tok_dir), {}
  for i, r in enumerate(recs):
    e = encode(r, tok, "llama3", image_tokens=IMG_TOKENS, image_token_id=IMG_ID)
    out[tuple(e["input_ids"].tolist())] = (i, e["labels"].tolist())
  return out


def segments(batch):
  """[(row, segment id, token tuple, labels, positions)] for every sample in a batch."""
  out = []
  for b in range(batch["input_ids"].shape[0]):
    seg = batch["segment_ids"][b]
    for k in sorted(set(seg.tolist()) - {0}):
      idx = np.flatnonzero(seg == k)
      assert (np.diff(idx) == 1).all(), "a sample's tokens must be contiguous"
      out.append((b, k, tuple(batch["input_ids"][b, idx].tolist()),
                  batch["labels"][b, idx].tolist(), batch["positions"][b, idx]))
  return out


def assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], np.ndarray):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    else:
      assert a[k] == b[k], k


# --- sources -------------------------------------------------------------------------------------

def test_json_index_lazy_cached_and_exact(tmp_path):
  recs = [{"id": "ü-1", "conversations": [{"from": "human", "value": "a ] } \" \\ [ {"}]},
          {"id": 2, "nested": [[1, 2], {"x": "é"}]}, "a string", 3.5, None]
  data = tmp_path / "data"
  path = write_data(str(data), recs)
  cache = tmp_path / "cache"
  src = JsonSource(path, cache_dir=str(cache))
  assert [src[i] for i in range(len(src))] == recs
  assert sorted(os.listdir(data)) == ["data.json", "img"]   # nothing written next to the data
  assert len(os.listdir(cache)) == 1
  # JSON lines read the same way; a changed file gets a fresh index.
  (data / "data.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
  assert [JsonSource(str(data / "data.jsonl"))[i] for i in range(5)] == recs
  (data / "data.json").write_text(json.dumps(recs[:2]))
  assert len(json_index(str(data / "data.json"), str(cache))) == 2
  for broken in ('[{"id": 1}, {"id": ', '[{"id": 1},]', '[{"id": 1}] x'):
    (data / "bad.json").write_text(broken)
    with pytest.raises(BadSample, match="bad.json") as e:
      JsonSource(str(data / "bad.json"))
    assert e.value.reason == "malformed_json"


def write_array_record(records, path: str) -> int:
  """The samples as one ArrayRecord file, one JSON sample a record (what ArrayRecordSource reads)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  writer, n = ArrayRecordWriter(path, "group_size:1"), 0
  try:
    for rec in records:
      writer.write(json.dumps(rec, ensure_ascii=False).encode("utf-8"))
      n += 1
  finally:
    writer.close()
  return n


def test_array_record_source_gives_the_same_batches(tmp_path, tok_dir):
  recs = [sample(i) for i in range(12)]
  path = write_data(str(tmp_path), recs)
  ar = str(tmp_path / "data.array_record")
  assert write_array_record(recs, ar) == 12
  assert [ArrayRecordSource(ar)[i] for i in range(12)] == recs
  one = gp.ShardOptions(0, 1)
  a = list(make_iterator(config(path, tok_dir), shard=one))
  b = list(make_iterator(config(ar, tok_dir, image_root=str(tmp_path)), shard=one))
  assert len(a) == 4
  for x, y in zip(a, b):
    assert_same(x, y)


def test_tfds_source_feeds_the_pipeline(tmp_path, tok_dir):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from data import tfds_builders as builders
  src = tmp_path / "vqa-rad" / "data"
  src.mkdir(parents=True)
  qa = [("Is there a fracture?", "no"), ("Where is the lesion?", "left lung"),
        ("Is the heart enlarged?", "no")]
  imgs = []
  for i in range(3):
    b = io.BytesIO()
    Image.new("RGB", (6, 6), colour(i)).save(b, format="PNG")
    imgs.append({"bytes": b.getvalue(), "path": f"{i}.png"})
  pq.write_table(pa.table({"image": imgs, "question": [q for q, _ in qa],
                           "answer": [a for _, a in qa]}),
                 str(src / "train-00000-of-00001.parquet"))
  builders.build("vqa_rad", str(tmp_path / "vqa-rad"), str(tmp_path / "tfds"))
  cfg = config("tfds:vqa_rad:train", tok_dir, tfds_data_dir=str(tmp_path / "tfds"),
               num_epochs=1, group_window=1)
  batch = next(make_iterator(cfg, shard=gp.ShardOptions(0, 1)))
  convs = [[{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
           for q, a in qa]
  want = reference([{"image": "x", "conversations": c} for c in convs], tok_dir)
  got = segments(batch)
  assert len(got) == 3
  for b, _, ids, labels, _ in got:
    i, want_labels = want[ids]
    assert labels == want_labels
    assert (batch["pixel_values"][b, 0] == colour(i)).all()


# --- sharding, layouts, state --------------------------------------------------------------------

def test_two_shards_disjoint_and_cover_the_epoch(tmp_path, tok_dir):
  recs = [sample(i, image=i % 4 != 3) for i in range(24)]
  path = write_data(str(tmp_path), recs)
  ref = reference(recs, tok_dir)
  seen = []
  for shard in range(2):
    batches = list(make_iterator(config(path, tok_dir), shard=gp.ShardOptions(shard, 2)))
    assert len(batches) == 4   # 12 samples per shard, batches of 3
    mine = []
    for batch in batches:
      assert batch["input_ids"].shape[1] in (24, 48, 72, 96)   # the pad buckets
      for b, k, ids, labels, pos in segments(batch):
        i, want_labels = ref[ids]
        assert k == 1 and labels == want_labels and (pos == np.arange(len(ids))).all()
        img = batch["pixel_values"][b, 0]
        assert (img == colour(i)).all() if recs[i].get("image") else not img.any()
        mine.append(i)
    seen.append(mine)
  assert set(seen[0]).isdisjoint(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(24))
  # each epoch is reshuffled: the second epoch of shard 0 covers a different half
  two = list(make_iterator(config(path, tok_dir, num_epochs=2), shard=gp.ShardOptions(0, 2)))
  epoch2 = [ref[s[2]][0] for batch in two[4:] for s in segments(batch)]
  assert len(epoch2) == 12 and set(epoch2) != set(seen[0])


def test_packing_keeps_samples_whole_apart_and_images_in_order(tmp_path, tok_dir):
  recs = [sample(i, image=i % 3 != 2) for i in range(30)]
  path = write_data(str(tmp_path), recs)
  ref = reference(recs, tok_dir)
  cfg = config(path, tok_dir, mode="pack", max_len=128, max_images_per_row=3, pack_bins=6)
  batches = list(make_iterator(cfg, shard=gp.ShardOptions(0, 1)))
  seen, multi = [], 0
  for batch in batches:
    assert batch["input_ids"].shape == (3, 128)
    assert batch["pixel_values"].shape == (3, 3, SIDE, SIDE, 3)
    for b in range(3):
      segs = [s for s in segments(batch) if s[0] == b]
      multi += len(segs) > 1
      assert [s[1] for s in segs] == list(range(1, len(segs) + 1))
      pad = batch["segment_ids"][b] == 0
      assert (batch["labels"][b][pad] == -100).all() and (batch["input_ids"][b][pad] == 0).all()
      with_image = []
      for _, _, ids, labels, pos in segs:
        i, want_labels = ref[ids]   # whole sample, never split
        assert labels == want_labels and (pos == np.arange(len(ids))).all()
        seen.append(i)
        if recs[i].get("image"):
          with_image.append(i)
      for k in range(3):   # the row's images in segment order, then zero images
        img = batch["pixel_values"][b, k]
        assert (img == colour(with_image[k])).all() if k < len(with_image) else not img.any()
  assert len(seen) == len(set(seen)) and len(seen) >= 24 and multi > 0


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_restored_state_continues_with_the_identical_batch(tmp_path, tok_dir, mode):
  recs = [sample(i) for i in range(40)]
  recs[5] = {"id": "lonely", "conversations": [{"from": "human", "value": "hello?"}]}
  path = write_data(str(tmp_path), recs)
  cfg = config(path, tok_dir, mode=mode, max_len=128, group_window=3, num_epochs=None)
  it = make_iterator(cfg, shard=gp.ShardOptions(0, 1))
  for _ in range(5):   # pad: mid-way through the second window of 3 batches
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  again = make_iterator(cfg, shard=gp.ShardOptions(0, 1))
  again.set_state(state)
  for w in want:
    assert_same(w, next(again))
  assert want[-1]["skipped"] == {"one_sided": 1}


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_text_only_batches_carry_no_images(tmp_path, tok_dir, mode):
  recs = [sample(i, image=i == 3) for i in range(10)]
  path = write_data(str(tmp_path), recs)
  cfg = config(path, tok_dir, mode=mode, max_images_per_row=0, per_process_batch=2)
  batches = list(make_iterator(cfg, shard=gp.ShardOptions(0, 1)))
  assert batches and all("pixel_values" not in b for b in batches)
  assert batches[-1]["skipped"] == {"too_many_images": 1}
  assert not (np.concatenate([b["input_ids"].ravel() for b in batches]) == IMG_ID).any()


@pytest.mark.slow   # kept out of the 10-minute default run (make test-all runs it)
def test_worker_processes_give_the_same_batches(tmp_path, tok_dir):
  recs = [sample(i) for i in range(12)]
  path = write_data(str(tmp_path), recs)
  cfg = config(path, tok_dir, mode="pack", max_len=128, max_images_per_row=2)
  local = list(make_iterator(cfg, shard=gp.ShardOptions(0, 1)))
  it = make_iterator(dataclasses.replace(cfg, worker_count=2), shard=gp.ShardOptions(0, 1))
  try:
    first = next(it)
    json.dumps(it.get_state())   # what a checkpoint stores
    rest = list(it)
  finally:
    it.close()
  assert len(local) == 1 + len(rest) >= 2
  for a, b in zip(local, [first] + rest):
    assert_same(a, b)


def test_anyres_tiles_and_placeholders(tmp_path, tok_dir):
  from vlm.tiler import anyres_grid, anyres_num_features
  recs = [sample(i) for i in range(6)]
  path = write_data(str(tmp_path), recs)
  pins = ((14, 28), (28, 14), (28, 28))
  geometry = dataclasses.replace(GEOMETRY, tiler="anyres", pinpoints=pins, image_size=14,
                                 patch_size=7)
  cfg = config(path, tok_dir, geometry=geometry, max_len=160, per_process_batch=2)
  tok = load(tok_dir)
  seen = set()
  for batch in make_iterator(cfg, shard=gp.ShardOptions(0, 1)):
    assert batch["pixel_values"].shape == (2, 1, 5, 14, 14, 3)
    for b in range(2):
      text = tok.decode([t for t in batch["input_ids"][b] if t != IMG_ID])
      i = int(re.search(r"Case (\d+):", text).group(1))
      seen.add(i)
      h, w, rows, cols = batch["image_sizes"][b, 0]
      assert (h, w) == (4 + i % 2, 5 + i % 3)
      assert (rows, cols) == anyres_grid((h, w), pins, 14)   # the host's grid, for the model
      assert (batch["input_ids"][b] == IMG_ID).sum() == anyres_num_features((h, w), pins, 14, 7)
      tiles = batch["pixel_values"][b, 0]
      assert (tiles[0] == colour(i)).all()   # the squashed base image comes first
      assert tiles.reshape(5, -1).any(axis=1).sum() in (3, 5)   # base + 1x2 / 2x1 / 2x2 grid
  assert seen == set(range(6))


# --- bad input -----------------------------------------------------------------------------------

def mismatch_tokenizer(path) -> str:
  """Llama-3 specials over a byte-level BPE without pre-tokenization whose merge '\\n\\nY' crosses
  the llama3 template's header/answer boundary: answers starting with 'Y' cannot be tokenized per
  turn the way the whole text is (a real template/tokenizer disagreement)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  merges = [("Ċ", "Ċ"), ("ĊĊ", "Y")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA3_SPECIAL[0],
                                 eos_token=LLAMA3_SPECIAL[1])
  fast.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL[2:]})
  fast.save_pretrained(path)
  return str(path)


BAD = {
    "missing_image": {"image": "img/gone.png"},
    "corrupt_image": {"image": "img/corrupt.png"},
    "path_escape": {"image": "../outside.png"},
    "malformed": {"conversations": [{"from": "human"}, {"from": "gpt", "value": "No."}]},
    "empty_conversation": {"conversations": []},
    "one_sided": {"conversations": [{"from": "gpt", "value": "No."}]},
    "template_mismatch": {"conversations": [{"from": "human", "value": "<image>\nIs it ok?"},
                                            {"from": "gpt", "value": "Yes, it is."}]},
    "too_long": {"conversations": [{"from": "human", "value": "why? " * 80 + "<image>"},
                                   {"from": "gpt", "value": "No."}]},
    "too_many_images": {"image": ["img/0.png", "img/1.png"]},
}


def bad_data(root):
  recs = [sample(i) for i in range(6)]
  for reason, patch in BAD.items():
    recs.append({**sample(0), "id": f"bad-{reason}", **patch})
  path = write_data(str(root / "data"), recs)
  (root / "data" / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  Image.new("RGB", (4, 4)).save(root / "outside.png")   # exists, but outside the root
  return path


def test_bad_inputs_are_counted_and_named_in_lenient_mode(tmp_path, caplog):
  path = bad_data(tmp_path)
  tok = mismatch_tokenizer(tmp_path / "tok")
  cfg = config(path, tok, max_len=256, per_process_batch=2, group_window=1, log_skips=1)
  with caplog.at_level(logging.WARNING, logger="data.pipeline"):
    batches = list(make_iterator(cfg, shard=gp.ShardOptions(0, 1)))
  assert sum(b["input_ids"].shape[0] for b in batches) == 6
  assert batches[-1]["skipped"] == {reason: 1 for reason in BAD}
  for reason in BAD:
    assert f"sample 'bad-{reason}'" in caplog.text and f"[{reason}]" in caplog.text


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_inputs_raise_naming_the_sample_in_strict_mode(tmp_path, reason):
  path = bad_data(tmp_path)
  recs = json.loads(open(path).read())
  keep = [r for r in recs if r["id"] in ("s1", f"bad-{reason}")]
  path = write_data(str(tmp_path / "data"), keep, name="one.json")
  tok = mismatch_tokenizer(tmp_path / "tok")
  cfg = config(path, tok, max_len=256, strict=True, per_process_batch=1, group_window=1)
  with pytest.raises(BadSample) as e:
    list(make_iterator(cfg, shard=gp.ShardOptions(0, 1)))
  assert e.value.reason == reason and e.value.sample_id == f"bad-{reason}"
  assert f"sample 'bad-{reason}'" in str(e.value) and "one.json" in str(e.value)


def _first_batch_within(it, seconds=60):
  """next(it) in a thread: the old skip loop spun forever on all-bad endless data."""
  import threading
  out = {}

  def take():
    try:
      out["batch"] = next(it)
    except BaseException as e:  # noqa: BLE001 - handed to the test
      out["error"] = e
  t = threading.Thread(target=take, daemon=True)
  t.start()
  t.join(seconds)
  assert not t.is_alive(), "the iterator never returned: an endless skip loop"
  return out


@pytest.mark.parametrize("n, limits, why", [
    (25, {}, "the first 20 samples were all bad"),
    (6, {"max_leading_skips": 0, "max_skipped_fraction": 1.0}, r"a whole epoch \(6 samples\)")])
def test_skip_guard_stops_endless_all_bad_data(tmp_path, tok_dir, n, limits, why):
  """A wrong image root with train.steps (endless epochs): the guard stops at once, summing the
  skips up per reason; a whole bad epoch stops it whatever the limits."""
  path = write_data(str(tmp_path), [sample(i) for i in range(n)])
  cfg = config(path, tok_dir, image_root=str(tmp_path / "elsewhere"), num_epochs=None, **limits)
  out = _first_batch_within(make_iterator(cfg, shard=gp.ShardOptions(0, 1)))
  assert isinstance(out.get("error"), SkipGuardError), out
  msg = str(out["error"])
  assert re.search(why, msg) and "(skipped: missing_image " in msg, msg
  assert "first missing_image: [missing_image]" in msg and "data.json, sample 's" in msg, msg
  assert str(tmp_path / "elsewhere" / "img") in msg   # the path it looked for, not img/3.png


def test_skip_guard_fraction_and_its_state(tmp_path, tok_dir):
  recs = [sample(i) for i in range(40)]
  for i in (3, 17, 30, 38):
    recs[i]["image"] = "img/gone.png"
  path = write_data(str(tmp_path), recs)
  strict = config(path, tok_dir, skip_check_after=10, max_skipped_fraction=0.05, num_epochs=1)
  with pytest.raises(SkipGuardError, match=r"of \d+ samples were bad \(\d+\.\d%, more than "
                     r"data.max_skipped_fraction=0.05\) \(skipped: missing_image \d\)"):
    list(make_iterator(strict, shard=gp.ShardOptions(0, 1)))
  ok = dataclasses.replace(strict, max_skipped_fraction=0.2)
  it = make_iterator(ok, shard=gp.ShardOptions(0, 1))
  rows = [next(it)["input_ids"].shape[0] for _ in range(3)]
  again = make_iterator(ok, shard=gp.ShardOptions(0, 1))
  again.set_state(json.loads(json.dumps(it.get_state())))   # the guard's counters restore too
  assert sum(rows) + sum(b["input_ids"].shape[0] for b in again) == 36
  assert again.skip_counts() == {"missing_image": 4}
  # all-bad data that ends (epochs) before any limit: the end says so, it is not a clean end
  bad = write_data(str(tmp_path / "b"), [{**sample(i), "image": "img/gone.png"} for i in range(3)])
  with pytest.raises(SkipGuardError, match=r"a whole epoch \(3 samples\) in a row was bad"):
    list(make_iterator(config(bad, tok_dir, num_epochs=1), shard=gp.ShardOptions(0, 1)))


# --- placement -----------------------------------------------------------------------------------

def test_to_global_places_the_batch_on_the_mesh(tmp_path, tok_dir):
  recs = [sample(i) for i in range(8)]
  path = write_data(str(tmp_path), recs)
  batch = next(make_iterator(config(path, tok_dir, per_process_batch=8, group_window=1),
                             shard=gp.ShardOptions(0, 1)))
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  out = to_global(batch, mesh)
  assert out["skipped"] == batch["skipped"]
  for k, v in batch.items():
    if isinstance(v, np.ndarray):
      assert out[k].shape == v.shape and out[k].sharding.spec == PartitionSpec(("data", "fsdp"))
      assert len(out[k].addressable_shards) == 8
      np.testing.assert_array_equal(np.asarray(out[k]), v)


def test_config_from_model_matches_the_model():
  from vlm.config import preset
  c = DataConfig.from_model(preset("llama3_med"), paths=["x.json"], per_process_batch=2)
  g = c.geometry
  assert (g.image_size, g.image_tokens, g.tiler, c.template) == (1134, 729, "s2", "llama3")
  assert c.image_token_id == 128256 and c.images_per_row() == 1
  assert c.buckets() == [512, 1024, 1536, 2048]
  assert DataConfig.from_model(preset("llama3_med"), mode="pack").images_per_row() == 2
  a = DataConfig.from_model(preset("llava16_vicuna_13b"))
  g = a.geometry   # anyres: image_size is the side of each tile
  assert (g.tiler, g.image_size, g.patch_size, g.max_tiles, a.template) == (
      "anyres", 336, 14, 5, "vicuna_v1")
