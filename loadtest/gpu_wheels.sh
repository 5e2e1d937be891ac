#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (it holds torch, triton, numpy, pillow, safetensors,
# httpx, pytest, prometheus-client, anyio, matplotlib, scikit-learn, torchmetrics; no network).
# Run here, in the repo root, before `run`; name .whl in the call's carry. Python 3.12 there.
set -euo pipefail
cd "$(dirname "$0")/.."
# Keep .whl/ out of git status (and so out of what travels uncarried); a clone may lack info/.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  python-dotenv==1.2.4 importlib-metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0
du -sh .whl
