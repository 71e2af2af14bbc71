#!/usr/bin/env bash
# Create (or refresh) the MONAI Label virtual environment, .venv-label; a no-op when it is up to date.
#   VENV_LABEL=.venv-label  PYTHON=python3.11
# MONAI Label 0.8.5 needs pydicom<3 while the project pins pydicom>=3, so the server lives in its own venv.
# The project is installed there with --no-deps plus its runtime dependencies under a constraints file, so pip can
# never swap torch / pydicom / MONAI underneath MONAI Label. A stamp keyed on this script + pyproject.toml makes a
# second run instant (the tests and `make label` call it every time).
set -euo pipefail
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."

VENV=${VENV_LABEL:-.venv-label}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
LABEL_PKGS="monailabel==0.8.5 pydicom<3 dicomweb-client[gcp]<0.60 pynetdicom<3 dcmqi"

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for p in python3.11 python3.12 python3.10 python3; do
    if command -v "$p" >/dev/null 2>&1; then echo "$p"; return; fi
  done
  echo "error: no python3 found (Python >= 3.10 is required)" >&2; exit 1
}

key=$( { cat "$SCRIPT" pyproject.toml; } | sha1sum | cut -c1-12)
stamp="$VENV/.cardiac-label-env-$key"
if [ -f "$stamp" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

PY=$(pick_python)
if [ ! -x "$VENV/bin/python" ]; then
  echo ">> creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
constraints="$VENV/constraints.txt"
# every later pip call runs under these pins: MONAI Label's deps or ours must not move torch, pydicom or MONAI
{
  for p in $TORCH_PINS; do echo "$p"; done
  echo "pydicom<3"
  echo "pynetdicom<3"
  echo "dicomweb-client<0.60"
  echo "monai==1.6.1"
} > "$constraints"

echo ">> installing $TORCH_PINS + MONAI Label 0.8.5 into $VENV (first time: several minutes)"
"$VPY" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$VPY" -m pip install -q --progress-bar off -c "$constraints" $TORCH_PINS
# shellcheck disable=SC2086
"$VPY" -m pip install -q --progress-bar off -c "$constraints" $TORCH_PINS $LABEL_PKGS

# our runtime dependencies, read from pyproject.toml, minus the two that MONAI Label pins differently (torch, pydicom)
deps=$("$VPY" - <<'PYDEPS'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
keep = [d for d in deps if re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower() not in {"torch", "pydicom"}]
print("\n".join(keep))
PYDEPS
)
mapfile -t dep_list <<<"$deps"
"$VPY" -m pip install -q --progress-bar off -c "$constraints" "${dep_list[@]}"
"$VPY" -m pip install -q --progress-bar off --no-deps -e .
"$VPY" -c "import torch, monai, monailabel, pydicom, common; \
print('>> label environment ready: torch', torch.__version__, 'monai', monai.__version__, \
'monailabel', monailabel.__version__, 'pydicom', pydicom.__version__)"
rm -f "$VENV"/.cardiac-label-env-*
touch "$stamp"
