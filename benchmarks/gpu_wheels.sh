#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (it has torch, triton, transformers, timm, tensorboard, pytest,
# pytest-benchmark), gathered here into .whl/ (git-ignored) for the device tool to carry.
# There, each call starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.7.0 hjson==3.1.0 \
    pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    inf-cl==1.2.1  # the contrastive benchmark's third baseline (pure Python + Triton)
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8  # an sdist on PyPI: built here, pure Python
ls -la .whl
