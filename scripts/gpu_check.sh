#!/usr/bin/env bash
# The GPU check (README, "GPU check"): the GPU tests, attribution on a Gemma-2-2B-shaped slice in float32 and
# bfloat16, and CLT training throughput, on one NVIDIA GPU in under 8 minutes, into one JSON:
# ${OUT:-.}/gpu_check.json (its path is printed last). Fails loudly: any failing command stops it, status != 0.
#
#   scripts/gpu_check.sh [--dry-run] [gpu_check.py options]   # --dry-run: shapes shrunk, on the CPU in seconds
#   PYTHON=/opt/venv/bin/python scripts/gpu_check.sh          # the Python to use (default python3): torch with CUDA
#   scripts/gpu_check.sh --fetch-wheels                       # on a machine that reaches a package registry
#
# A GPU machine without internet (the lent H200's image holds torch, numpy, transformers 5, pytest...):
# --fetch-wheels downloads into .whl/, for Python 3.12 on x86-64 Linux, the packages the check imports that
# such an image lacks, in the versions installed for $PYTHON here (the dry run also passes with the image's
# transformers 5.17, tokenizers 0.23 and huggingface-hub 1.33). Where .whl/ exists, the check installs them
# into a temporary folder first and puts it on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(transformer-lens datasets dill multiprocess better-abc typeguard)

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
    exclude=$(git rev-parse --git-path info/exclude)  # .whl/ travels when a run carries it, never committed
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
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
