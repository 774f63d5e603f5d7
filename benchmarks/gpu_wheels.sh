#!/usr/bin/env bash
# The wheels benchmarks/gpu_suite.py needs on the GPU machine, downloaded here into .whl/ (git-ignored).
#
# The GPU machine has PyTorch, numpy, Pillow, safetensors, tokenizers, accelerate and the other common
# packages, but no diffusers or peft, an older transformers and huggingface-hub, and it cannot download
# anything. This fetches the versions the pack is tested with for CPython 3.12 on x86-64 Linux, each
# without its dependencies, plus those of their dependencies the machine lacks or has too old
# (transformers 5.25 wants huggingface-hub >= 2.4, which wants httpx2; kernels wants tomlkit; accelerate,
# which peft imports, at the version tested with that huggingface-hub). Carry .whl to the machine; gpu_suite.py installs it at start
# (--wheels .whl, the default when the folder exists) into a private folder ahead of what is installed.
#
#     bash benchmarks/gpu_wheels.sh            # then: python benchmarks/gpu_suite.py --budget-s 500 --out results.json
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
rm -rf "$DEST" && mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DEST" \
    diffusers==0.42.1 peft==0.21.2 transformers==5.25.0 \
    huggingface_hub==2.4.0 hf-xet==1.8.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 \
    kernels==0.19.1 tomlkit==0.15.3 regex==2026.12.2 importlib_metadata==10.2.0 accelerate==1.16.0
du -sh "$DEST"
ls -l "$DEST"
