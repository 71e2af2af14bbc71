#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from nothing; quick when it is up to date.
#   VENV=.venv  PYTHON=python3.11  TORCH_SPEC="torch==2.13.0"  EXTRAS="dicom,test"
# A stamp file keyed on pyproject.toml + TORCH_SPEC + EXTRAS makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dicom,test}
# Debian packages the test suite and demo need: Orthanc + its DICOMweb plugin and DCMTK for the PACS tests
# (tests/tools/pacs start their own Orthanc on free loopback ports; the Debian service is not used).
SYSTEM_PACKAGES=${SYSTEM_PACKAGES:-orthanc orthanc-dicomweb dcmtk}

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for p in python3.11 python3.12 python3.10 python3; do
    if command -v "$p" >/dev/null 2>&1; then echo "$p"; return; fi
  done
  echo "error: no python3 found (Python >= 3.10 is required)" >&2; exit 1
}

key=$( { cat pyproject.toml; echo "$TORCH_SPEC $EXTRAS $SYSTEM_PACKAGES"; } | sha1sum | cut -c1-12)
stamp="$VENV/.cardiac-env-$key"
if [ -f "$stamp" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

if [ -n "$SYSTEM_PACKAGES" ]; then
  missing=""
  for pkg in $SYSTEM_PACKAGES; do dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"; done
  if [ -n "$missing" ]; then
    echo ">> installing Debian packages:$missing"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
  fi
fi

PY=$(pick_python)
"$PY" - <<'PYCHECK'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"error: Python >= 3.10 is required, found {sys.version.split()[0]}")
PYCHECK

if [ ! -x "$VENV/bin/python" ]; then
  echo ">> creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
echo ">> installing $TORCH_SPEC and the project with extras [$EXTRAS] into $VENV (first time: several minutes)"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and on its own: the CPU wheel on this kind of machine, a CUDA build for GPU users (see README)
"$VENV/bin/python" -m pip install -q --progress-bar off "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q --progress-bar off -e ".[${EXTRAS}]"
"$VENV/bin/python" -c "import torch, monai, common; print('>> environment ready: torch', torch.__version__, 'monai', monai.__version__)"
rm -f "$VENV"/.cardiac-env-*
touch "$stamp"
