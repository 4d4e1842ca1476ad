# karma8 tasks. `just` itself installs from PyPI: pip install rust-just
set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes
default:
    @just --list

# Start the local stack (API + 6 buckets as plain processes)
dev *ARGS:
    scripts/dev.sh {{ARGS}}

# Set up and run every check and test (what CI runs)
test *ARGS:
    scripts/test.sh {{ARGS}}

# Lint, type-check and check generated code for drift
check:
    EXTRAS="[dev]" source scripts/venv.sh && python scripts/gen_proto.py --check && ruff check . && ruff format --check . && mypy

# Regenerate the protobuf code from protos/
proto:
    EXTRAS="[dev]" source scripts/venv.sh && python scripts/gen_proto.py

# Throughput and memory benchmark (see docs/performance.md)
bench *ARGS:
    source scripts/venv.sh && python scripts/bench.py {{ARGS}}

# Chaos run: traffic while uploads, clients, buckets and the API are killed (see docs/chaos.md)
chaos *ARGS:
    source scripts/venv.sh && python scripts/chaos.py {{ARGS}}

# Evenness benchmark: 6 buckets, 2 added, rebalance, more data (see docs/placement.md)
balance *ARGS:
    source scripts/venv.sh && python scripts/balance.py {{ARGS}}
