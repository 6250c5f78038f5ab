#!/usr/bin/env bash
# Fetch, on this (CPU) machine, the pure-Python wheels the GPU machine lacks for the magics and
# widget tests (its image has torch, transformers and accelerate, not IPython or anywidget).
# They land in .whl/ (git-ignored via .git/info/exclude); carry .whl with the device call and
# start it with benchmarks/gpu_run.sh, which installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    "ipython>=8.12,<10" ipython_pygments_lexers traitlets decorator jedi parso matplotlib-inline pexpect \
    ptyprocess prompt_toolkit wcwidth stack_data executing asttokens pure_eval \
    anywidget ipywidgets widgetsnbextension jupyterlab_widgets comm psygnal
# bitsandbytes for the quantized tiers (tests/gpu/test_quant_gpu.py, bench_quant.py): 43 MB with its CUDA
# libraries, within what a device call carries.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl "bitsandbytes==0.50.2"
ls .whl
