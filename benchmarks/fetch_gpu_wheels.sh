#!/usr/bin/env bash
# Downloads, on a machine with PyPI access, the wheels that benchmarks/gpu_check.sh
# installs on a GPU host without internet: ml-collections and clu (the config and
# logging libraries the project imports), Pillow (JPEG decoding of the carried
# images) and the small dependencies a bare JAX install may lack. All are built for
# CPython 3.12 on manylinux x86-64 (or are pure Python), whatever the local Python.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # into .whl/ at the repository root
#   bash benchmarks/fetch_gpu_wheels.sh DIR        # into DIR
set -euo pipefail

cd "$(dirname "$0")/.."
dest="${1:-.whl}"
pip="${PIP:-/work/venv/bin/pip}"
command -v "$pip" >/dev/null 2>&1 || pip="python3 -m pip"

# The versions tested with this project. gpu_check.sh installs a wheel only when
# the package is missing on the GPU host, so extra wheels cost nothing but bytes.
packages=(
    ml-collections==1.1.0
    clu==0.0.12
    pillow==13.0.0
    wrapt==2.5.2
    absl-py==2.5.1
    PyYAML==6.0.4
    etils==1.15.0
    packaging==25.0
    typing_extensions==4.16.0
)

mkdir -p "$dest"
for spec in "${packages[@]}"; do
    $pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$dest" "$spec"
done
ls -l "$dest"
du -sh "$dest"
