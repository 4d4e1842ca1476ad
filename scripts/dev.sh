#!/usr/bin/env bash
# Set up (first run only) and start the local stack: an API server on ws://127.0.0.1:8080
# and 8 buckets as plain processes under ./karma8-data. Arguments go to `karma8 up`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec karma8 up "$@"
