#!/usr/bin/env bash
# Wheels for running the benchmarks on a bare GPU machine (Python 3.12, torch and torchvision already there,
# no network): the packages it lacks plus this project, into the git-ignored .whl/ (about 15 MiB).
# Run from the repo root on a machine with pip access:  bash benchmarks/gpu_wheels.sh
# Then carry .whl to the GPU machine and run:           bash benchmarks/gpu_run.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p .whl
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d .whl \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7 \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
    dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 tornado==6.6.1 zict==3.0.0
rm -f .whl/semspai-*.whl
rm -rf build/  # setuptools' build/lib would keep modules deleted from the tree
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
rm -rf build/
du -sh .whl
