"""data.ldrt: blur/size filter on real images, mention extraction, TF-IDF templates, split, and the whole
command against the loopback server (tests/llm_server.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.filters import gaussian

from data import ldrt
from data.errors import BadSample
from llm_server import LLMServer, Reply, tag_of

MARKDOWN = """# Low-dose irradiation of tumours

## Results

Tumour growth slowed after low-dose exposure (Fig. 2). Survival improved in all groups, see Figure 2A and Table 1.
As shown in Figs. 2-3, immune infiltration increased over time. Smith et al. found similar data in Fig. 12.
The dose-response relation is summarized in Table 1. Figure 20 shows an unrelated control.

**Figure 2.** Growth curves of irradiated tumours in all groups.

| dose | n |
|------|---|
| 0.5 Gy | 10 |

![](figures/fig2.png)

No figure is cited in this sentence. Figure 3B shows infiltrating [lymphocytes](#ref3).
"""


def _sharp() -> np.ndarray:
  return skdata.immunohistochemistry()  # 512x512 RGB micrograph, bundled with scikit-image


def _blurred(img: np.ndarray, sigma: float = 2.0) -> np.ndarray:
  return gaussian(img, sigma=sigma, channel_axis=-1, preserve_range=True).round().astype(np.uint8)


def test_blur_filter_keeps_sharp_image_and_drops_its_blurred_copy(tmp_path):
  img = _sharp()
  Image.fromarray(img).save(tmp_path / "sharp.png")
  Image.fromarray(_blurred(img)).save(tmp_path / "blurred.png")
  sharp = ldrt.check_image(str(tmp_path / "sharp.png"), 100, 100.0)
  blurred = ldrt.check_image(str(tmp_path / "blurred.png"), 100, 100.0)
  assert sharp["reason"] is None and sharp["laplacian_var"] > 100 and (sharp["width"], sharp["height"]) == (512, 512)
  assert blurred["reason"] == "blurry" and blurred["laplacian_var"] < 100
  # thresholds are configurable: with a low enough threshold the blurred copy passes
  assert ldrt.check_image(str(tmp_path / "blurred.png"), 100, blurred["laplacian_var"] / 2)["reason"] is None


def test_small_missing_and_corrupt_images_are_dropped(tmp_path):
  Image.fromarray(_sharp()[:80, :300]).save(tmp_path / "flat.png")
  (tmp_path / "bad.png").write_bytes(b"not a png")
  assert ldrt.check_image(str(tmp_path / "flat.png"), 100, 100.0) == {"width": 300, "height": 80,
                                                                      "reason": "too_small"}
  assert ldrt.check_image(str(tmp_path / "flat.png"), 50, 0.0)["reason"] is None
  assert ldrt.check_image(str(tmp_path / "nope.png"), 100, 100.0)["reason"] == "missing_image"
  assert ldrt.check_image(str(tmp_path / "bad.png"), 100, 100.0)["reason"] == "corrupt_image"


def test_mention_extraction_finds_the_citing_sentences():
  m = ldrt.mentions_by_figure(MARKDOWN)
  s_fig2 = "Tumour growth slowed after low-dose exposure (Fig. 2)."
  s_fig2a = "Survival improved in all groups, see Figure 2A and Table 1."
  s_figs23 = "As shown in Figs. 2-3, immune infiltration increased over time."
  s_tab1 = "The dose-response relation is summarized in Table 1."
  assert m[("Figure", "2")] == [s_fig2, s_fig2a, s_figs23]  # not the caption paragraph, not Fig. 12 / 20
  assert m[("Figure", "3")] == [s_figs23, "Figure 3B shows infiltrating lymphocytes."]
  assert m[("Table", "1")] == [s_fig2a, s_tab1]
  assert m[("Figure", "12")] == ["Smith et al. found similar data in Fig. 12."]
  assert ("Table", "2") not in m
  assert ldrt.find_references("Figures 1, 3 and 5-7, Table S2 and Fig. 4A-C") == {
      ("Figure", "1"), ("Figure", "3"), ("Figure", "5"), ("Figure", "6"), ("Figure", "7"), ("Figure", "4"),
      ("Table", "S2")}


def test_template_matching_picks_the_expected_template():
  templates = ldrt.load_templates()
  assert len(templates) == 20 and "Describe the contents of this image in detail." in templates
  matcher = ldrt.TemplateMatcher(templates)
  cases = {
      "The contents of this image, described in detail: a western blot with four lanes.":
          "Describe the contents of this image in detail.",
      "Analyzed in a comprehensive manner, the figure compares tumour volume across doses.":
          "Analyze the figure in a comprehensive manner.",
      "Key findings: survival is longer after low-dose exposure, summarize the curves shown.":
          "Summarize the key findings shown in this figure.",
      "Information that can be understood: the figure plots dose against response.":
          "What information can be understood from this figure?",
      "An exhaustive depiction: the given image is a bar chart of four groups.":
          "Write an exhaustive depiction of the given image.",
  }
  idx, sim = matcher.match(list(cases))
  assert [templates[i] for i in idx] == list(cases.values())
  assert (sim > 0).all()
  _, sim0 = matcher.match(["Zebrafish larvae glow green."])
  assert sim0[0] == 0  # no shared term: the caller falls back to a seeded random template


def test_split_by_article_is_seeded_and_disjoint():
  arts = [f"paper{i}" for i in range(200)]
  held = ldrt.split_articles(arts * 2, 0.03, seed=1)
  assert len(held) == 6 and held <= set(arts)
  assert held == ldrt.split_articles(list(reversed(arts)), 0.03, seed=1)
  assert held != ldrt.split_articles(arts, 0.03, seed=2)
  assert len(ldrt.split_articles(["a", "b", "c"], 0.03, seed=0)) == 1  # at least one eval article
  assert ldrt.split_articles(["a"], 0.03, seed=0) == set()


def _build_corpus(root: Path) -> None:
  """Four articles as pdffigures2 + Marker leave them, with sharp, blurred, tiny, missing and escaping images."""
  figs, md, imgs = root / "figures", root / "md", root / "figures" / "img"
  imgs.mkdir(parents=True)
  md.mkdir()
  sharp = _sharp()
  crops = [sharp[:256, :256], sharp[256:, :256], sharp[:256, 256:], sharp[256:, 256:]]
  for a in range(4):
    art = f"paper{a}"
    Image.fromarray(crops[a]).save(imgs / f"{art}-Figure1-1.png")
    Image.fromarray(crops[(a + 1) % 4]).save(imgs / f"{art}-Table1-1.png")
    entries = [
        {"name": "1", "figType": "Figure", "page": 2, "caption": f"Figure 1: [[{art}_Figure1]] Tumour growth.",
         "renderURL": f"/elsewhere/run/{art}-Figure1-1.png"},  # moved pdffigures2 output: found by file name
        {"name": "1", "figType": "Table", "page": 3, "caption": f"Table 1: [[{art}_Table1]] Doses.",
         "renderURL": f"{art}-Table1-1.png"}]
    if a == 0:
      Image.fromarray(_blurred(crops[0], 3.0)).save(imgs / "paper0-Figure2-1.png")
      Image.fromarray(crops[0][:60]).save(imgs / "paper0-Figure3-1.png")
      entries += [
          {"name": "2", "figType": "Figure", "caption": "Figure 2: blurred.", "renderURL": "paper0-Figure2-1.png"},
          {"name": "3", "figType": "Figure", "caption": "Figure 3: tiny.", "renderURL": "paper0-Figure3-1.png"},
          {"name": "4", "figType": "Figure", "caption": "Figure 4: gone.", "renderURL": "missing.png"},
          {"name": "5", "figType": "Figure", "caption": "Figure 5: escape.", "renderURL": "../../etc/passwd"}]
    (figs / f"{art}.json").write_text(json.dumps(entries))
    if a != 3:
      (md / f"{art}.md").write_text(f"Tumours shrank in {art} (Fig. 1). Doses are listed in Table 1.\n")


def _reply(req, attempt):
  tag = tag_of(req)
  system = req["messages"][0]["content"]
  if "detailed description" in system:
    if tag == "paper2_Figure1" and attempt == 1:
      return Reply(status=503)
    return Reply(f"The contents of this image, described in detail: growth curves for {tag}.")
  if tag == "paper2_Table1":
    return Reply("Sure! Here is a question about the table.")  # malformed: no Question/Answer
  return Reply(f"**Question:** Why do the curves for {tag} diverge?\n**Answer:** Because dose matters.")


def test_ldrt_command_end_to_end_with_resume(tmp_path, capsys):
  _build_corpus(tmp_path)
  out = tmp_path / "out"
  base = ["--figures-dir", str(tmp_path / "figures"), "--markdown-dir", str(tmp_path / "md"),
          "--image-root", str(tmp_path / "figures" / "img"),
          "--out-dir", str(out), "--seed", "3", "--backoff", "0.001", "--concurrency", "2"]
  assert ldrt.main(base) == 0  # no endpoint: filter only
  kept = [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]
  dropped = {d["pair_id"]: d["reason"] for d in map(json.loads, (out / "dropped.jsonl").read_text().splitlines())}
  assert dropped == {"paper0_Figure2": "blurry", "paper0_Figure3": "too_small", "paper0_Figure4": "missing_image",
                     "paper0_Figure5": "path_escape"}
  assert sorted(k["pair_id"] for k in kept) == sorted(f"paper{a}_{t}1" for a in range(4) for t in ("Figure", "Table"))
  k0 = next(k for k in kept if k["pair_id"] == "paper0_Figure1")
  assert k0["image"] == "paper0-Figure1-1.png" and k0["mentions"] == ["Tumours shrank in paper0 (Fig. 1)."]
  assert next(k for k in kept if k["pair_id"] == "paper3_Table1")["mentions"] == []  # no markdown for paper3

  with LLMServer(_reply) as srv:
    ep = ["--endpoint", f"qwen={srv.url},qwen2-72b,1"]
    assert ldrt.main(base + ep + ["--limit", "5"]) == 0
    first = [json.loads(line)["id"] for line in (out / "generated.progress.jsonl").read_text().splitlines()]
    assert len(first) == 5
    n_logged = len(srv.log)
    assert ldrt.main(base + ep) == 0
    asked_again = [f"{e['tag']}:{'detail' if 'detailed description' in e['system'] else 'complex'}"
                   for e in srv.log[n_logged:]]
  rows = [json.loads(line) for line in (out / "generated.progress.jsonl").read_text().splitlines()]
  ids = [r["id"] for r in rows]
  assert sorted(ids) == sorted(f"{k['pair_id']}:{t}" for k in kept for t in ldrt.TASKS)  # all, once each
  assert sorted(asked_again) == sorted([*(set(ids) - set(first)), "paper2_Figure1:detail"])  # + one 503 retry

  train = json.loads((out / "train.json").read_text())
  evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
  rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
  assert [(r["id"], r["reason"]) for r in rejects] == [("paper2_Table1:complex", "unparseable")]
  assert len(train) + len(evals) == 15
  train_arts = {t["id"].split("_")[0] for t in train}
  eval_arts = {e["article"] for e in evals}
  assert len(eval_arts) == 1 and not train_arts & eval_arts
  for t in train:
    conv = t["conversations"]
    assert [c["from"] for c in conv] == ["human", "gpt"] and conv[0]["value"].count("<image>") == 1
    assert (tmp_path / "figures" / "img" / t["image"]).is_file()
    if t["id"].endswith("_detail"):
      assert conv[0]["value"].replace("<image>", "").strip() == "Describe the contents of this image in detail."
    else:
      assert "Why do the curves" in conv[0]["value"] and conv[1]["value"] == "Because dose matters."
  # eval.json: the held-out rows as LLaVA conversations (the training configs' eval.paths)
  eval_conv = json.loads((out / "eval.json").read_text())
  assert [c["id"] for c in eval_conv] == [e["question_id"] for e in evals]
  for c, e in zip(eval_conv, evals):
    assert c["image"] == e["image"] and c["conversations"][1]["value"] == e["answer"]
  for e in evals:
    assert set(e) >= {"question_id", "image", "question", "answer", "caption", "context", "category"}
    assert e["category"] in ("detail", "complex") and "<image>" not in e["question"] and e["caption"]
  summary = capsys.readouterr().err
  assert "dropped: blurry" in summary and "train samples" in summary and "tokens out" in summary
  # The LDRT training recipes read what this command writes (train and held-out conversations).
  from configs import ldrt_llava15_lora, ldrt_llava16_lora
  for recipe in (ldrt_llava15_lora, ldrt_llava16_lora):
    c = recipe.get_config()
    assert json.loads((out / Path(c.data.paths[0]).name).read_text()) == train
    assert json.loads((out / Path(c.eval.paths[0]).name).read_text()) == eval_conv


def test_bad_figure_file_is_named(tmp_path):
  (tmp_path / "paperX.json").write_text("{not json")
  with pytest.raises(BadSample, match="paperX.json"):
    ldrt.scan(tmp_path, None, tmp_path)
  kept, dropped, counts = ldrt.scan(tmp_path, None, tmp_path, lenient=True)
  assert kept == [] and counts["skipped bad figure files"] == 1
