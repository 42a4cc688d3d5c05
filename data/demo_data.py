"""The embedded demo data set: real biomedical images that ship inside installed packages.

Sources (licences recorded in docs/demo_data.md):
- pydicom test data: CT_small.dcm (axial CT, NEMA WG04 CT1_UNC downsized) and MR_small.dcm (MR,
  NEMA WG04 MR1_UNC downsized), read through data.image.load_image (DICOM windowing included);
- scikit-image: retina (CC0 fundus photograph), microaneurysms (CC0 fundus crop, FAU),
  immunohistochemistry (colonic glands, DAB + hematoxylin; no known copyright restrictions).

Each source yields several views (crops, flips, quarter turns, mild intensity changes) so the tiny
demo model sees variation; held-out views form the VQA test split. Captions (stage 1), multi-turn
conversations (stage 2) and VQA questions (OPEN and CLOSED) were written for this project and are in
LLaVA-Med JSON format.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image

from data.image import load_image
from data.jsonfile import load_json, write_json

SOURCES = {
    # key: (loader, modality, organ / subject, short answer for "what modality")
    "ct": dict(modality="ct", long="computed tomography (CT) slice",
               subject="a thoracic vertebra with the spinal canal, between the lungs",
               colour="grayscale", organ="spine"),
    "mri": dict(modality="mri", long="magnetic resonance (MRI) slice", subject="soft tissue",
                colour="grayscale", organ=None),  # the anatomy of MR_small is not documented
    "fundus": dict(modality="fundus photograph", long="colour fundus photograph",
                   subject="the retina with the optic disc and vessels", colour="colour",
                   organ="retina"),
    "microaneurysm": dict(modality="fundus photograph", long="fundus image crop",
                          subject="retinal vessels with small round microaneurysms",
                          colour="grayscale", organ="retina"),
    "histology": dict(modality="histology", long="immunohistochemistry micrograph",
                      subject="colonic glands stained with DAB and hematoxylin", colour="colour",
                      organ="colon"),
}

CAPTIONS = {
    "ct": ["Axial CT slice through a thoracic vertebra.", "Computed tomography image of the spine.",
           "A grayscale CT cross-section with the lungs."],
    "mri": ["MRI slice.", "Magnetic resonance image, single slice.",
            "A grayscale MR cross-section."],
    "fundus": ["Colour fundus photograph of the retina.", "Fundus image showing optic disc and vessels.",
               "Retinal photograph of a normal eye."],
    "microaneurysm": ["Fundus crop with microaneurysms.", "Retinal vessels with microaneurysms.",
                      "Grayscale fundus detail showing microaneurysms."],
    "histology": ["Immunohistochemistry of colonic glands.", "Histology slide stained with DAB.",
                  "Micrograph of colonic glands with hematoxylin counterstain."],
}


def _raw_images() -> dict:
  import skimage.data
  from pydicom.data import get_testdata_file
  gray = lambda a: np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a
  return {
      "ct": load_image(get_testdata_file("CT_small.dcm")),
      "mri": load_image(get_testdata_file("MR_small.dcm")),
      "fundus": skimage.data.retina(),
      "microaneurysm": gray(skimage.data.microaneurysms()),
      "histology": skimage.data.immunohistochemistry(),
  }


def _view(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  h, w = img.shape[:2]
  frac = rng.uniform(0.7, 1.0)
  ch, cw = int(h * frac), int(w * frac)
  y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  out = img[y:y + ch, x:x + cw]
  if rng.random() < 0.5:
    out = out[:, ::-1]
  out = np.rot90(out, int(rng.integers(0, 4)))
  gain = rng.uniform(0.85, 1.15)
  return np.clip(out.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def _qa(key: str, rng: np.random.Generator) -> list:
  s = SOURCES[key]
  other = rng.choice([k for k in SOURCES if SOURCES[k]["modality"] != s["modality"]])
  o = SOURCES[other]["modality"]
  pool = [
      ("What imaging modality is this?", f"This is a {s['long']}; the modality is {s['modality']}."),
      (f"Is this a {o} image?", f"No, it is a {s['modality']} image."),
      (f"Is this a {s['modality']} image?", f"Yes, it is a {s['modality']} image."),
      ("Describe the image.", f"A {s['colour']} {s['long']} showing {s['subject']}."),
  ]
  if s["organ"]:
    pool.append(("Which organ is shown?", f"The image shows the {s['organ']}."))
  idx = rng.permutation(len(pool))[:2]
  convs = []
  for n, i in enumerate(idx):
    q, a = pool[i]
    if n == 0:
      q = f"<image>\n{q}" if rng.random() < 0.5 else f"{q}\n<image>"
    convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  return convs


def _vqa(key: str, rng: np.random.Generator) -> list:
  s = SOURCES[key]
  other = rng.choice([k for k in SOURCES if SOURCES[k]["modality"] != s["modality"]])
  yes = rng.random() < 0.5
  asked = s["modality"] if yes else SOURCES[other]["modality"]
  out = [("What imaging modality is this?", s["modality"], "OPEN"),
         (f"Is this a {asked} image?", "yes" if yes else "no", "CLOSED")]
  if s["organ"]:
    out.append(("Which organ is shown?", s["organ"], "OPEN"))
  return out


def write(out_dir: str, *, train_views: int = 32, test_views: int = 4, seed: int = 0,
          side: Optional[int] = 112) -> dict:
  """Write images/ and stage{1,2}_{train,eval}.json + vqa_test.json; returns their paths.
  Held-out views feed the eval files and the VQA split. `side` bounds the stored image size."""
  rng = np.random.default_rng(seed)
  img_dir = os.path.join(out_dir, "images")
  os.makedirs(img_dir, exist_ok=True)
  stage1, stage2, test, held1, held2 = [], [], [], [], []
  for key, img in _raw_images().items():
    for v in range(train_views + test_views):
      view = _view(img, rng)
      pil = Image.fromarray(view)
      if side and max(pil.size) > side:
        pil.thumbnail((side, side), Image.BICUBIC)
      name = f"{key}_{v:02d}.png"
      pil.save(os.path.join(img_dir, name))
      rel = f"images/{name}"
      caption = {"id": f"{key}-{v}-cap", "image": rel, "conversations": [
          {"from": "human", "value": "<image>"},
          {"from": "gpt", "value": str(rng.choice(CAPTIONS[key]))}]}
      chat = {"id": f"{key}-{v}-qa", "image": rel, "conversations": _qa(key, rng)}
      if v < train_views:
        stage1.append(caption)
        stage2.append(chat)
      else:
        held1.append(caption)
        held2.append(chat)
        for j, (q, a, kind) in enumerate(_vqa(key, rng)):
          test.append({"id": f"{key}-{v}-q{j}", "image": rel, "answer_type": kind,
                       "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                         {"from": "gpt", "value": a}]})
  order = rng.permutation(len(stage1))
  paths = {}
  for name, rows in (("stage1_train", [stage1[i] for i in order]),
                     ("stage2_train", [stage2[i] for i in order]), ("stage1_eval", held1),
                     ("stage2_eval", held2), ("vqa_test", test)):
    paths[name] = os.path.join(out_dir, f"{name}.json")
    write_json(paths[name], rows)
  from pydicom.data import get_testdata_file
  paths["ct_dicom"] = get_testdata_file("CT_small.dcm")
  return paths


def corpus(paths: dict) -> list:
  """All demo text (for training the demo tokenizer)."""
  out = []
  for name in ("stage1_train", "stage2_train", "vqa_test"):
    for row in load_json(paths[name]):
      out += [t["value"].replace("<image>", "") for t in row["conversations"]]
  return out
