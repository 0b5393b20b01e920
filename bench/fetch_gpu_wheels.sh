#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels bench/gpu_session.sh installs on the GPU machine,
# whose image has torch but not opacus, pydantic, monai (the 3D families' exactness) or our timm.
# Python 3.12, x86-64. Writes .whl/.
set -eu
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  opacus==1.6.0 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  timm==1.0.31 typing_extensions==4.16.0 monai==1.6.1
ls .whl
