#!/usr/bin/env bash
# Download the wheels of bench/device_wheels.txt (Python 3.12, x86-64 Linux) into .whl/ at the
# repo root, for a `run` on the nvidia-h200 machine, which has no package registry. The command is
# the one /work/.library/device/README.md gives; --no-deps, so device_wheels.txt names every
# missing dependency itself. Each `run` then carries ".whl" and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
# (docs/benchmarks.md, "Running the owed GPU measurements"). .whl/ must stay out of git:
# `echo /.whl/ >> .git/info/exclude` once per checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! git check-ignore -q .whl/x.whl 2>/dev/null; then
  echo "fetch_wheels: .whl/ is not ignored by git; run: echo /.whl/ >> .git/info/exclude" >&2
  exit 1
fi
mkdir -p .whl
rm -f .whl/*.whl   # one version of each: two would stop the whole install on the device
sed -e 's/#.*//' -e '/^[[:space:]]*$/d' bench/device_wheels.txt | xargs "$PY" -m pip download -q \
  --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl
ls -1 .whl
du -ch .whl/*.whl | tail -1
