"""One tiny-model server per test process, shared by the server and browser tests: the app of
serve/server.py run by uvicorn on a loopback port in a thread, beside the Generator whose engine
it serves (tests compare answers with the independent greedy oracle, tests/greedy.py).

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
from serve.generate import Generator
from serve.sampling import SamplingParams
from serve.server import Background, create_app
from tests.tiny_ckpt import shared_llava_checkpoint

MAX_NEW = 12
MODEL = "tiny-llava"
DICOM = pydicom.data.get_testdata_file("CT_small.dcm")
LIMITS = dict(max_request_bytes=2**20, max_image_pixels=512 * 512, max_images=4, max_tokens=32)
ROWS = 4  # engine slots


class Running(Background):
  """The app on a loopback port (serve.server.Background), plus GET-as-JSON for the tests."""

  def get(self, path: str) -> dict:
    with urllib.request.urlopen(self.url + path, timeout=30) as r:
      return json.loads(r.read())


@functools.lru_cache(maxsize=None)
def shared_server() -> Running:
  """The tiny llama3-template Llava behind the API: 12 new tokens by default, ROWS engine slots
  of the model's whole context, every program compiled at start, tight limits, an image root
  holding slide.png and ct.dcm."""
  gen = Generator.from_checkpoint(shared_llava_checkpoint())
  root = tempfile.mkdtemp(prefix="serve_root_")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(
      os.path.join(root, "slide.png"))
  shutil.copy(DICOM, os.path.join(root, "ct.dcm"))
  engine = gen.engine(gen.context_layout(ROWS), max_queue=16)
  engine.warmup()
  app = create_app(engine, model_name=MODEL, limits=api.Limits(**LIMITS, image_root=root),
                   defaults=SamplingParams(max_tokens=MAX_NEW))
  srv = Running(app)
  atexit.register(srv.close)
  srv.gen, srv.engine, srv.image_root = gen, engine, root
  return srv
