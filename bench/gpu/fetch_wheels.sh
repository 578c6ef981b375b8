#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that bench/gpu/run.sh installs on a GPU machine
# that has no network but already holds CUDA PyTorch (an ML image: torch, tokenizers, safetensors,
# numpy, httpx, pytest). They are what midfill's engine imports beyond that -- pydantic and
# pydantic-settings -- plus transformers at the version midfill is tested with (serving.attention and
# serving.kv_slots use its attention and cache interfaces, which move between releases).
# Versions come from requirements-lock.txt so the GPU run tests what CI tests.
#
# --with-ray adds Ray Serve and what it needs that the GPU image (image-packages.txt) lacks, for the
# endpoint benchmark: ~120 MB, more than one transfer to such a machine may carry (64 MiB), so all
# wheels are packed into one tar split in two: .whl/ for a first call, .whl-2/ for a second
# (run.sh says how).
#
#   bash bench/gpu/fetch_wheels.sh [--python 3.12] [--with-ray]     # -> .whl/ [.whl-2/] (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=3.12 WITH_RAY=
while [ $# -gt 0 ]; do
  case $1 in
    --python) PYVER=$2; shift 2 ;;
    --with-ray) WITH_RAY=1; shift ;;
    *) echo "usage: $0 [--python X.Y] [--with-ray]" >&2; exit 2 ;;
  esac
done
BASE=(pydantic pydantic_core annotated-types typing-inspection pydantic-settings python-dotenv transformers)
SERVE=(ray fastapi starlette uvicorn)
PART_BYTES=$((58 * 1024 * 1024))  # per transfer, leaving room for the working tree itself

norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
pin() {  # the lock's exact version of a package
  local want; want=$(norm "$1")
  while IFS='=' read -r name _ version; do
    [ "$(norm "$name")" = "$want" ] && { echo "$version"; return; }
  done < requirements-lock.txt
  echo "fetch_wheels: $1 is not in requirements-lock.txt" >&2; exit 1
}
download() {  # download [pip options...] SPECS...: wheels for the GPU machine's Python and platform
  python3 -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}

rm -rf .whl .whl-2
stage=$(mktemp -d)
specs=(); for n in "${BASE[@]}"; do specs+=("$n==$(pin "$n")"); done
download --no-deps -d "$stage" "${specs[@]}"  # the image has everything else they need
if [ -n "$WITH_RAY" ]; then
  deps=$(mktemp -d)
  serve=("ray[serve]==$(pin ray)"); for n in "${SERVE[@]:1}"; do serve+=("$n==$(pin "$n")"); done
  download -d "$deps" "${serve[@]}" "${specs[@]}"  # resolved with dependencies
  for whl in "$deps"/*.whl; do
    name=$(norm "$(basename "$whl" | cut -d- -f1)")
    grep -qx "$name" bench/gpu/image-packages.txt || mv -n "$whl" "$stage/"
  done
  rm -rf "$deps"
fi
mkdir -p .whl
if [ "$(du -cb "$stage"/*.whl | tail -n 1 | cut -f1)" -le "$PART_BYTES" ]; then
  mv "$stage"/*.whl .whl/
else
  mkdir -p .whl-2
  tar -C "$stage" -cf - . | split -b "$PART_BYTES" -d - .whl/bundle.tar.part-
  for part in .whl/bundle.tar.part-*; do [ "$part" = .whl/bundle.tar.part-00 ] || mv "$part" .whl-2/; done
  [ "$(ls .whl-2 | wc -l)" -eq 1 ] || { echo "fetch_wheels: the bundle needs more than two transfers" >&2; exit 1; }
fi
rm -rf "$stage"
ls -1 .whl ${WITH_RAY:+.whl-2}
du -sh .whl ${WITH_RAY:+.whl-2}
