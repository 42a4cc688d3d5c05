"""One tiny-model server per test process, shared by the server and browser tests: the app of
serve/server.py run by uvicorn on a loopback port in a thread, beside the Generator it serves
(tests compare answers with that Generator's own output for the same prompt).

  srv = shared_server()        # srv.url, srv.gen, srv.image_root, srv.get(path) ...
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
import urllib.request

import numpy as np
import pydicom.data
from PIL import Image

from serve import api
from serve.generate import GenerationConfig, Generator
from serve.server import Background, create_app
from tests.tiny_ckpt import shared_llava_checkpoint

MAX_NEW = 12
MODEL = "tiny-llava"
DICOM = pydicom.data.get_testdata_file("CT_small.dcm")
LIMITS = dict(max_request_bytes=2**20, max_image_pixels=512 * 512, max_images=4, max_tokens=32)
ROWS = 4  # every batch padded to 4 rows: the tests compile few programs


class Running(Background):
  """The app on a loopback port (serve.server.Background), plus GET-as-JSON for the tests."""

  def get(self, path: str) -> dict:
    with urllib.request.urlopen(self.url + path, timeout=30) as r:
      return json.loads(r.read())


@functools.lru_cache(maxsize=None)
def shared_server() -> Running:
  """The tiny llama3-template Llava behind the API: 12 new tokens by default, batches padded to
  ROWS rows, a 50 ms batching window (clients that start together share a batch), tight
  limits, an image root holding slide.png and ct.dcm."""
  gen = Generator.from_checkpoint(shared_llava_checkpoint())
  root = tempfile.mkdtemp(prefix="serve_root_")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(
      os.path.join(root, "slide.png"))
  shutil.copy(DICOM, os.path.join(root, "ct.dcm"))
  app = create_app(gen, model_name=MODEL, limits=api.Limits(**LIMITS, image_root=root),
                   defaults=GenerationConfig(max_new_tokens=MAX_NEW), max_batch=ROWS,
                   max_queue=16, window=0.05, pad_batches=True)
  srv = Running(app)
  atexit.register(srv.close)
  srv.gen, srv.image_root = gen, root
  return srv
