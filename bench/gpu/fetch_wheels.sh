#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that bench/gpu/run.sh installs on a GPU machine
# that has no network but already holds CUDA PyTorch (an ML image: torch, tokenizers, safetensors,
# numpy, httpx, pytest). They are what midfill's engine imports beyond that -- pydantic and
# pydantic-settings -- plus transformers at the version midfill is tested with (serving.attention and
# serving.kv_slots use its attention and cache interfaces, which move between releases).
# Versions come from requirements-lock.txt so the GPU run tests what CI tests.
#
#   bash bench/gpu/fetch_wheels.sh [--python 3.12]     # -> .whl/ (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=3.12
[ "${1:-}" = "--python" ] && PYVER=$2
DEST=.whl
NAMES=(pydantic pydantic_core annotated-types typing-inspection pydantic-settings python-dotenv transformers)

pin() {  # the lock's exact version of a package (names compared case- and separator-insensitively)
  local want; want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  while IFS='=' read -r name _ version; do
    [ "$(echo "$name" | tr 'A-Z_.' 'a-z--')" = "$want" ] && { echo "$version"; return; }
  done < requirements-lock.txt
  echo "fetch_wheels: $1 is not in requirements-lock.txt" >&2; exit 1
}

rm -rf "$DEST" && mkdir -p "$DEST"
specs=(); for n in "${NAMES[@]}"; do specs+=("$n==$(pin "$n")"); done
# --no-deps: the GPU image has everything else; pip needs one --platform per manylinux tag to accept.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${specs[@]}"
ls -1 "$DEST"
du -sh "$DEST"
