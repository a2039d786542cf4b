#!/usr/bin/env bash
# The main job: install what it needs, then train/evaluate/fold/export the demo on this CPU.
# Extra arguments go to tools/run_demo.py (e.g. --output-dir DIR, KEY VALUE overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/install_data.sh
exec .venv/bin/python tools/run_demo.py "$@"
