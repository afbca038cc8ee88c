#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git), the wheels the GPU check needs on the GPU machine's image
# (Python 3.12, x86-64, jax 0.11.2 with CUDA, triton 3.6; no network there). Pinned; about 6 MiB.
#   bash scripts/gpu_wheels.sh            then carry ".whl" to the GPU machine: bash scripts/gpu_check.sh
# Not carried: tokamax's xprof (22 MiB, and it pulls gcsfs): without it `import tokamax` may fail, and
# the check then says why it left tokamax out.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  ml_collections==1.1.0      # the run configs (experiments/configs)
  tensorboardX==2.6.5        # moe_jax.metrics
  jax-triton==0.3.1          # the jax-triton gating kernel; 0.3.1 wants triton>=3.6 and jax>=0.8.2 (0.4 wants triton 3.7)
  tokamax==0.0.17            # the grouped-matmul benchmark's tokamax ragged_dot, with its light dependencies:
  einshape==1.0
  qwix==0.1.8
  immutabledict==4.3.1
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in .venv/bin/python python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then PY=$candidate; break; fi
  done
fi
[ -n "$PY" ] || { echo "error: no python with pip found; set PYTHON=/path/to/python" >&2; exit 1; }
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
size=$(du -sm .whl | cut -f1)
echo "wrote $(ls .whl | wc -l) wheels to .whl/ (${size} MiB)"
if [ "$size" -ge 64 ]; then echo "error: .whl is ${size} MiB; the GPU machine takes at most 64 MiB in all" >&2; exit 1; fi
