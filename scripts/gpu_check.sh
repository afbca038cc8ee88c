#!/usr/bin/env bash
# The one-command GPU check (experiments/gpu_check.py): run from the repository root on the GPU
# machine's image, offline. It installs the carried wheels (.whl/, from scripts/gpu_wheels.sh) and
# this project with --no-deps into a target folder, then runs every part under its own time limit
# and writes gpu_check.json, gpu_check.md and gpu_check.log to OUT_DIR (default $OUT, else gpu_check/).
#
#   bash scripts/gpu_check.sh [OUT_DIR] [--dry-run] [more flags of experiments/gpu_check.py]
#
# --dry-run: the same on the CPU at tiny shapes (the test suite runs it; GPU-only parts are skipped).
# Ends within 8 minutes on one H200. Exit status 1 if a part failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu_check}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT_DIR=$1; shift; fi
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then ARGS+=(--dry_run); else ARGS+=("$arg"); fi
done
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-$(mktemp -d /tmp/moe_jax_site.XXXXXX)}
mkdir -p "$OUT_DIR" "$SITE"

install() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || { echo "error: installing the carried wheels (.whl/) failed" >&2; return 1; }
    echo "installed $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
  else
    echo "no carried wheels (.whl/ is empty or absent; scripts/gpu_wheels.sh makes them): using what is installed"
  fi
  # The project itself, not editable, with the image's setuptools (no network: no build isolation).
  if "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .; then
    echo "installed moe-jax into $SITE"
  else  # still run from the source tree: moe_jax/__init__.py adds $SITE/moe_jax, which holds the kernels
    echo "warning: installing moe-jax into $SITE failed; running from the source tree (kernels linked)" >&2
    mkdir -p "$SITE/moe_jax" && ln -sfn "$PWD/kernels" "$SITE/moe_jax/kernels"
  fi
}

{ time install; } 2>&1 | tee "$OUT_DIR/install.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" experiments/gpu_check.py --out="$OUT_DIR" "${ARGS[@]}"
