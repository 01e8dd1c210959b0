#!/usr/bin/env bash
# A separate environment for benchmarks/peers.py: optax 0.2.6 (the last release with
# optax.monte_carlo), PyTorch 2.13.0 (CPU build) and this checkout of scoregrad.
set -euo pipefail
VENV="${1:-/tmp/peers-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "optax==0.2.6" "torch==2.13.0" numpy
"$VENV/bin/pip" install -q -e "$(dirname "$0")/.." "optax==0.2.6"
echo "ready: $VENV/bin/python benchmarks/peers.py"
