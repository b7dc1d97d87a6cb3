#!/usr/bin/env bash
# Downloads the Debian packages of the libraries a bare GPU machine lacks (it has PyTorch,
# CMake, Ninja and the CUDA toolkit, but no package manager access) into .gpu-deps/ of this
# checkout, about 6 MB. scripts/gpu-check.sh unpacks them there. .gpu-deps/ is ignored by git;
# carry it along with the checkout.
#
#   scripts/pack-gpu-deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu-deps
mkdir -p "$dest"
grep -qx '/.gpu-deps/' .gitignore 2>/dev/null || echo '/.gpu-deps/' >> .gitignore
cd "$dest"
apt-get download -q \
  libfmt-dev libfmt9 libspdlog-dev libspdlog1.10 nlohmann-json3-dev catch2 libcli11-dev \
  libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libutf8proc-dev libutf8proc2 \
  libxxhash-dev libxxhash0 libsentencepiece-dev libsentencepiece0 libgloo-dev \
  libbenchmark-dev libbenchmark1debian 2>&1 | grep -v unsandboxed || true
ls -1
du -sh .
