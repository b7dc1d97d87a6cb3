#!/usr/bin/env bash
# Installs the Debian 12 packages Rhine needs, only those that are missing.
#
#   scripts/setup.sh            build + test dependencies
#   scripts/setup.sh --bench    also the Python PyTorch peer used by bench/
#
# Idempotent and quiet when nothing is missing; works as root or through sudo.
set -euo pipefail

packages=(
  # toolchain
  build-essential cmake ninja-build pkg-config git
  # LibTorch (CPU) and what makes it fast / distributed
  libtorch-dev libopenblas0-openmp libgloo-dev
  # torch-free layer
  libfmt-dev libspdlog-dev nlohmann-json3-dev libeigen3-dev libcli11-dev
  libpcre2-dev libutf8proc-dev libxxhash-dev
  # SentencePiece: training tool and test oracle (never linked with LibTorch)
  libsentencepiece-dev sentencepiece
  # tests and benchmarks
  catch2 libbenchmark-dev
  # plain python3 (no torch): independent safetensors reader in the formats/io tests;
  # venv for the project's Python environment (scripts/setup-python.sh)
  python3 python3-venv
)
for arg in "$@"; do
  case "$arg" in
    --bench) packages+=(python3-torch python3-numpy) ;;
    *) echo "[setup] unknown argument, got '$arg'; use --bench or nothing" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -eq 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "[setup] missing packages and no root rights, got: ${missing[*]}; run as root or install sudo" >&2
  exit 1
fi

echo "[setup] installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are absent or older than a day.
if [[ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -n 1)" ]]; then
  "${sudo[@]}" apt-get update -qq
fi
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "[setup] done"
