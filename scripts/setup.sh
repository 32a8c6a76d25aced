#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: the offline dataset package and a virtual
# environment in .venv with the pinned requirements.
# Usage: bash scripts/setup.sh [dev|cuda12|cuda13|tpu]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) >/dev/null \
      || echo "dataset-fashion-mnist did not install: TFDS will download Fashion-MNIST on first use." >&2
  else
    echo "No Debian dataset-fashion-mnist here: TFDS will download Fashion-MNIST on first use" \
         "(or run 'sudo apt-get install dataset-fashion-mnist' on Debian/Ubuntu)." >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# dev: the test dependencies too; cuda12, cuda13, tpu: jax's accelerator plugin, pinned to
# the same jax version in the same pip run, so nothing is swapped afterwards.
case "${1:-}" in
  '') req=requirements.txt ;;
  dev|cuda12|cuda13|tpu) req=requirements-$1.txt ;;
  *) echo "usage: bash scripts/setup.sh [dev|cuda12|cuda13|tpu]" >&2; exit 2 ;;
esac
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
# This checkout itself (pyproject.toml), editable and without dependencies: the pins above rule.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
