#!/usr/bin/env bash
# Install everything the tests need (venv, torch, detectron2, Fashion-MNIST) and run the suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/install_data.sh
exec .venv/bin/python -m pytest -q "$@"
