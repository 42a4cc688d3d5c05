"""Serve a model: an OpenAI-compatible API and a web chat page.

  python -m serve --ckpt runs/demo/stage2/final [--host 127.0.0.1 --port 8000]
  # chat page: http://127.0.0.1:8000/    API: http://127.0.0.1:8000/v1 (chat/completions, models)

CKPT is a checkpoint dir of this project, a HF model dir or a train.main workdir. The server binds
to loopback unless told otherwise. When the environment variable named by --api-key-env is set,
clients must send `Authorization: Bearer <its value>`. Images arrive as data: URIs; local paths
are read only from under --image-root. The sampling flags set the defaults of requests that do
not say.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from data.errors import UserError, cli_errors

DEFAULT_KEY_ENV = "MEDVLM_API_KEY"


def _parser() -> argparse.ArgumentParser:
  from serve import api
  from serve.generate import add_sampling_args
  d = api.Limits()
  p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", required=True,
                 help="checkpoint dir of this project, a HF model dir or a train.main workdir")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--served-model-name", default=None,
                 help="the model id clients name (default: the --ckpt path as given)")
  p.add_argument("--image-root", default=None,
                 help="dir local image paths are read from (default: none, data: URIs only)")
  p.add_argument("--api-key-env", default=DEFAULT_KEY_ENV,
                 help=f"environment variable holding the API key (default {DEFAULT_KEY_ENV}; "
                      "unset: no key needed)")
  from serve.generate import add_engine_args
  add_engine_args(p, slots=16)
  p.add_argument("--max-queue", type=int, default=64,
                 help="requests that may wait for a slot; more get 503")
  p.add_argument("--max-request-mb", type=float, default=d.max_request_bytes / 2**20)
  p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
  p.add_argument("--max-images", type=int, default=d.max_images, help="per request")
  p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens,
                 help="the largest max_tokens a request may ask for")
  add_sampling_args(p, max_new_tokens=512)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default float32); a HF dir's weights are cast to it")
  return p


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  with cli_errors():
    from serve import api
    from serve.generate import Generator, layout_from_args, sampling_params
    from serve import workdir
    for name in ("port", "slots", "max_queue", "max_image_pixels", "max_images",
                 "max_tokens_limit", "max_new_tokens"):
      if getattr(args, name) < 1:
        raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_root is not None and not os.path.isdir(args.image_root):
      raise UserError(f"--image-root {args.image_root}: no such directory")
    check_port(args.host, args.port)   # before the model loads (minutes for a large one)
    ckpt = workdir.resolve(args.ckpt)
    key = os.environ.get(args.api_key_env) or None if args.api_key_env else None
    limits = api.Limits(max_request_bytes=int(args.max_request_mb * 2**20),
                        max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                        max_tokens=args.max_tokens_limit, image_root=args.image_root)
    defaults = sampling_params(args)
    from vlm import compile_cache
    compile_cache.enable()
    gen = Generator.from_checkpoint(ckpt, dtype=args.dtype)
    engine = gen.engine(layout_from_args(args, gen.config, gen.cache_dtype),
                        max_queue=args.max_queue)
    engine.warmup(log=lambda m: print(m, file=sys.stderr))   # compile; check the KV cache fits
    serve(engine, args, limits, key, defaults)


def check_port(host: str, port: int) -> None:
  """Bind (host, port) once, as uvicorn will, so a busy port or a bad address fails at once."""
  import socket
  try:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      sock.bind(addr)
  except socket.gaierror as e:
    raise UserError(f"--host {host}: {e.strerror or e}") from None
  except OSError as e:
    raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; stop what uses it or "
                    "pass another --port") from None


def serve(engine, args, limits, key, defaults) -> None:
  import uvicorn

  from serve.server import create_app
  name = args.served_model_name or args.ckpt
  app = create_app(engine, model_name=name, limits=limits, defaults=defaults,
                   system=args.system, api_key=key)
  url = f"http://{args.host}:{args.port}"
  print(f"serving {name!r}: chat page {url}/   OpenAI API {url}/v1"
        + (f"   (API key from ${args.api_key_env})" if key else ""), file=sys.stderr)
  if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
    print(f"warning: listening on {args.host} without an API key (set ${args.api_key_env})",
          file=sys.stderr)
  uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
  main()
