#!/usr/bin/env bash
# Build .devcarry/, what bench/gpu_checks.sh needs on a lent GPU machine beyond the repository
# (run it here, where pip reaches PyPI; the device reaches nothing):
#   whl/         PyWavelets for the device's Python 3.12 on x86-64 (its image lacks it);
#   data/levin/  a copy of ../shared/data/levin (../shared does not travel with the tree);
#   cache/       the microscopy cases as .npz (psfmodels and flowdec's bars are not there).
# About 20 MB. Then, with the device tool: carry [".devcarry"] and the command
#   CARRY=.devcarry OUT=$OUT THROUGHPUT=0 SWEEP=bench/sweeps/<spec>.json bash bench/gpu_checks.sh
# (gpu_checks.sh installs the wheels and links the data when CARRY is set).
set -eu
dest=${1:-.devcarry}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$dest/whl" "$dest/data" "$dest/cache"
version=$(grep '^pywavelets==' constraints.txt | cut -d= -f3)
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest/whl" "pywavelets==$version"
rm -rf "$dest/data/levin"
cp -r ../shared/data/levin "$dest/data/levin"
chmod -R u+w "$dest/data/levin"
"$python" - "$dest/cache" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "bench")
from microscopy_data import CASES, load_case

for name in CASES:
    load_case(name, False, Path(sys.argv[1]))
PY
du -sh "$dest"
