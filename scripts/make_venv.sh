#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs moe-jax (editable) with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidates=()
  [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
  candidates+=(python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    for dir in "$(pyenv root)"/versions/3.12*; do
      [ -x "$dir/bin/python" ] && candidates+=("$dir/bin/python")
    done
  fi
  candidates+=(/usr/local/bin/python3.12 /usr/bin/python3.12 python3)
  for py in "${candidates[@]}"; do
    # pyenv shims exist for versions that are not selected: run it to be sure.
    if version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) && [ "$version" = "3.12" ]; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

if ! PY=$(find_python); then
  echo "error: no Python 3.12 found (jax 0.12 needs it). Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
  exit 1
fi
echo "using $PY ($("$PY" --version))"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  rm -rf .venv
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
touch .venv/.installed
