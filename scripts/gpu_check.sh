#!/usr/bin/env bash
# The GPU check (README, "GPU check"): the GPU tests, attribution on a Gemma-2-2B-shaped slice in float32 and
# bfloat16, and CLT training throughput, on one NVIDIA GPU in under 8 minutes, into one JSON:
# ${OUT:-.}/gpu_check.json (its path is printed last). Fails loudly: any failing command stops it, status != 0.
#
#   scripts/gpu_check.sh [--dry-run] [gpu_check.py options]   # --dry-run: shapes shrunk, on the CPU in seconds
#   PYTHON=/opt/venv/bin/python scripts/gpu_check.sh          # the Python to use (default python3): torch with CUDA
#   scripts/gpu_check.sh --fetch-wheels                       # on a machine that reaches a package registry
#
# A GPU machine without internet: --fetch-wheels downloads, into .whl/ beside this checkout, the wheels for
# Python 3.12 on x86-64 Linux of the packages the check imports that such an image lacks or holds in another
# version (their versions: those installed for $PYTHON here). Where .whl/ exists, the check installs them into
# a temporary folder first and puts it on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(transformer-lens transformers tokenizers huggingface-hub datasets dill multiprocess better-abc typeguard
        pyvis plotly ipython traitlets jsonpickle)

run() { printf '+ %s\n' "$*" >&2; "$@"; }

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    pins=()
    for name in "${WHEELS[@]}"; do
        pins+=("$name==$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
    done
    platforms=()
    for tag in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$tag")
    done
    run "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${pins[@]}"
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d)
    run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run "$PYTHON" scripts/gpu_check.py "$@"
