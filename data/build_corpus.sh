#!/usr/bin/env bash
# Builds the larger multilingual corpus (tens of MB of de/fr/nl/en text) from
# Debian packages: downloads them (no installation), unpacks them, and runs
# data/build_corpus.py.
#
#   data/build_corpus.sh [OUT] [--man] [--sample DIR]
#
# OUT defaults to build/corpus (train/ and heldout/ JSON Lines per language).
# --man also adds the German, French, Dutch and English man pages (not parallel).
# --sample DIR rewrites the committed sample (data/sample) from the same pages.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/corpus
extra=()
man=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --man) man=1; extra+=(--man); shift ;;
    --sample) extra+=(--sample "$2"); shift 2 ;;
    -*) echo "[corpus] unknown option, got '$1'; use --man or --sample DIR" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
scripts/setup.sh
command -v python3 >/dev/null || { echo "[corpus] python3 is missing; apt-get install python3" >&2; exit 1; }
packages=(libreoffice-help-de libreoffice-help-fr libreoffice-help-nl libreoffice-help-en-us)
if [[ $man == 1 ]]; then
  packages+=(manpages manpages-de manpages-fr manpages-nl)
  command -v groff >/dev/null || { echo "[corpus] --man needs groff; apt-get install groff-base" >&2; exit 1; }
fi

cache=build/corpus-cache
mkdir -p "$cache/debs" "$cache/root"
(
  cd "$cache/debs"
  for p in "${packages[@]}"; do
    ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download -q "$p" 2>&1 | grep -v -e unsandboxed -e '^Get:' || true
    ls "${p}"_*.deb >/dev/null 2>&1 || { echo "[corpus] could not download package, got '$p'; check apt sources (apt-get update)" >&2; exit 1; }
  done
)
for deb in "$cache"/debs/*.deb; do
  stamp="$cache/root/.$(basename "$deb").done"
  [[ -f "$stamp" ]] || { dpkg -x "$deb" "$cache/root" && touch "$stamp"; }
done
python3 data/build_corpus.py --root "$cache/root" --out "$out" "${extra[@]}"
echo "[corpus] written to $out"
