#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: the offline dataset package and a virtual
# environment in .venv with the pinned requirements. Usage: bash scripts/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) >/dev/null
  else
    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'." >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
req=requirements.txt; [ "${1:-}" = dev ] && req=requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
