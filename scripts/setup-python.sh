#!/usr/bin/env bash
# Creates (once) the project's Python environment from scripts/python-requirements.txt and
# prints its directory. It holds PyTorch 2.x (whose wheel is also LibTorch 2.x with CUDA and
# NCCL, for the second build) and the Hugging Face libraries the oracle tests compare with.
#
#   scripts/setup-python.sh            -> ${RHINE_PYTHON_ENV:-$HOME/.cache/rhine/py-<hash>}
#
# Idempotent: the directory's name carries a hash of the requirements file, so a changed pin
# makes a new environment and an unchanged one is reused without touching the network.
# Needs python3 (>= 3.10) with venv and pip, and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
req=scripts/python-requirements.txt
hash=$(sha256sum "$req" | cut -c1-12)
dir=${RHINE_PYTHON_ENV:-$HOME/.cache/rhine/py-$hash}
stamp="$dir/.rhine-requirements-$hash"
if [[ -f "$stamp" && -x "$dir/bin/python" ]]; then
  echo "$dir"
  exit 0
fi
python=${RHINE_PYTHON:-python3}
command -v "$python" >/dev/null ||
  { echo "[setup-python] no python3 found; install python3 and python3-venv (or set RHINE_PYTHON)" >&2; exit 1; }
echo "[setup-python] creating $dir from $req (PyTorch's CUDA wheel: a few GB, and llama.cpp built from source: 5-15 minutes)" >&2
rm -rf "$dir"
"$python" -m venv "$dir" >&2 ||
  { echo "[setup-python] '$python -m venv' failed; apt-get install python3-venv" >&2; exit 1; }
"$dir/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2 ||
  { echo "[setup-python] pip install -r $req failed (is PyPI reachable?); $dir is incomplete" >&2; exit 1; }
touch "$stamp"
echo "$dir"
