#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu_check.py unpacks on the lent GPU machine (which has no
# network and no diffusers): diffusers and what it needs at import that the machine's image lacks.
# The image (/work/.library/device/KINDS.md, read 2026-11-17) has huggingface-hub 1.33 (diffusers
# 0.42 needs >= 1.32), pillow, requests, filelock, numpy, regex, safetensors, zipp; not
# importlib_metadata (nor its dependency lazy-importer). gpu_check unpacks only the wheels whose
# distribution is missing there and reports any requirement left unmet.
# Into .gpu-wheels/ (git-ignored; ~6.5 MB): it travels with `carry: [".gpu-wheels"]` (64 MiB limit).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu-wheels
py="${PYTHON:-.venv/bin/python}"
# diffusers: the version these tests run against here
diffusers_version="$("$py" -c 'import importlib.metadata as m; print(m.version("diffusers"))' 2>/dev/null || echo 0.42.1)"
rm -rf "$dest"
mkdir -p "$dest"
"$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$dest" \
  "diffusers==${diffusers_version}" importlib_metadata lazy-importer
ls -l "$dest"
du -sh "$dest"
