#!/usr/bin/env bash
# Create (or reuse) the project virtual environment in .venv with torch, torchvision,
# detectron2 and the project itself installed. Idempotent: a second run only checks.
# A detectron2 that is already importable from the chosen Python is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MABN_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
D2_WHEEL_PIN="sal-detectron2==0.7.2"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing $TORCH_PIN $TORCHVISION_PIN (about a minute from the local cache)"
  "${PIP[@]}" "$TORCH_PIN" "$TORCHVISION_PIN"
fi

echo "[setup] installing detectron2's runtime dependencies"
# setuptools>=77 builds pyproject.toml's SPDX license; a Python 3.11 venv starts with 65.5.
"${PIP[@]}" "numpy<2" "setuptools>=77,<80" Pillow matplotlib pycocotools termcolor yacs tabulate \
  cloudpickle tqdm tensorboard "omegaconf>=2.1,<2.4" "hydra-core>=1.1" black packaging \
  fvcore iopath "opencv-python-headless<4.11" pytest onnx onnxscript onnxruntime imgviz==2.1.0

if "$PY" -c "import detectron2.modeling" 2>/dev/null; then
  echo "[setup] keeping the detectron2 already importable: $("$PY" -c 'import detectron2,os;print(os.path.dirname(detectron2.__file__))')"
else
  echo "[setup] installing detectron2 (pure-Python part of $D2_WHEEL_PIN)"
  PURELIB="$("$PY" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.10 --upgrade --target "$PURELIB" "$D2_WHEEL_PIN"
  rm -f "$PURELIB"/detectron2/_C.cpython-*.so
  # The wheel ships detectron2's example scripts as a top-level package "tools";
  # it would shadow this project's tools/ directory.
  rm -rf "$PURELIB/tools"
  "$PY" -c "import detectron2.modeling" || { echo "[setup] detectron2 failed to import" >&2; exit 1; }
fi

if ! "$PY" -m pip show -q mabn_d2 >/dev/null 2>&1; then
  echo "[setup] installing mabn_d2 (editable)"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
fi
echo "[setup] ready: $PY"
