#!/usr/bin/env bash
# One command for a new machine: install everything, then train the quickstart
# (generates the shapes data and the tiny VLM on first use; 6-10 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
# a fixed run folder, so the README's next command finds the model; --ckpt_path=last makes a
# re-run continue an interrupted training (or do nothing once it has finished)
"$PY" -m unifusion.cli fit -c experiments/quickstart.yaml --run_dir runs/quickstart --ckpt_path=last
