#!/usr/bin/env bash
# Set up (first run only) and run every check: generated-code drift, ruff, mypy, pytest.
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="[dev]" source scripts/venv.sh
python scripts/gen_proto.py --check
ruff check .
ruff format --check .
mypy
pytest "$@"
