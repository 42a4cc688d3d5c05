"""`python -m vlm.chat`: streams the answer the model gives for a DICOM or PNG image."""
import io
import subprocess
import sys

import numpy as np
import pydicom.data
import pytest
from PIL import Image

from data.image import load_image
from tests.tiny_ckpt import shared_llava_checkpoint
from vlm import chat
from vlm.generate import GenerationConfig, Generator
from vlm.prompt import build_prompt

DICOM = pydicom.data.get_testdata_file("CT_small.dcm")
MAX_NEW = 12


@pytest.fixture(scope="module")
def ckpt():
  return shared_llava_checkpoint()


@pytest.fixture(scope="module")
def png(tmp_path_factory):
  path = tmp_path_factory.mktemp("img") / "slide.png"
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
  return str(path)


def expected(ckpt, image_path, question):
  gen = Generator.from_checkpoint(ckpt)
  prompt = build_prompt(gen.config, gen.tokenizer, question, [load_image(image_path)])
  [res] = gen.generate([prompt], GenerationConfig(max_new_tokens=MAX_NEW))
  assert res.text, "the tiny model should say something for this prompt"
  return res.text


@pytest.mark.parametrize("image", ["dicom", "png"])
def test_one_question_streams_the_answer(ckpt, png, image, capsys):
  path = DICOM if image == "dicom" else png
  chat.main(["--ckpt", ckpt, "--image", path, "--max-new-tokens", str(MAX_NEW),
             "What is shown in the image?"])
  out = capsys.readouterr().out
  assert out.endswith("\n") and out.strip() == expected(ckpt, path, "What is shown in the image?")


def test_interactive_loop_switches_images(ckpt, png):
  args = chat._parser().parse_args(["--ckpt", ckpt, "--image", DICOM,
                                    "--max-new-tokens", str(MAX_NEW)])
  session = chat.Chat(args)
  inp = io.StringIO("Is there a fracture?\n\n/image missing.png\n"
                    f"/image {png}\nIs there a fracture?\n/quit\nnot asked\n")
  out = io.StringIO()
  chat.interactive(session, inp, out)
  turns = out.getvalue().split(chat.PROMPT)
  assert turns[1].strip() == expected(ckpt, DICOM, "Is there a fracture?")
  assert "error: [missing_image]" in turns[3] and "missing.png" in turns[3]
  assert turns[4] == "(image loaded)\n"
  assert turns[5].strip() == expected(ckpt, png, "Is there a fracture?")
  assert len(turns) == 7 and turns[6] == ""  # /quit ends the loop before "not asked"


def test_bad_image_is_a_clear_error(ckpt, tmp_path):
  bad = tmp_path / "scan.dcm"
  bad.write_bytes(b"not a dicom")
  with pytest.raises(SystemExit, match=r"corrupt_image.*scan\.dcm"):
    chat.main(["--ckpt", ckpt, "--image", str(bad), "question"])


def test_module_help():
  out = subprocess.run([sys.executable, "-m", "vlm.chat", "--help"], capture_output=True,
                       text=True, check=True).stdout
  assert "--temperature" in out and "--top-p" in out and "--max-new-tokens" in out
