# karma8 tasks. `just` itself installs from PyPI: pip install rust-just
set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes
default:
    @just --list

# Start the local stack without Docker (API + 8 buckets as plain processes, ./karma8-data)
dev *ARGS:
    scripts/dev.sh {{ARGS}}

# Set up and run every check and test, as CI does (arguments go to pytest)
test *ARGS:
    scripts/test.sh {{ARGS}}

# Lint, type-check and check the generated protobuf code for drift
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

# Fuzzer: hostile WebSocket sessions (or --raw bytes to the gRPC and metrics ports) against a local stack (see docs/fuzzing.md)
fuzz *ARGS:
    source scripts/venv.sh && python scripts/fuzz.py {{ARGS}}

# Evenness benchmark: 6 buckets, 2 added, rebalance, more data (see docs/placement.md)
balance *ARGS:
    source scripts/venv.sh && python scripts/balance.py {{ARGS}}

# Build the image and start the service stack in Docker (needs KARMA8_SECRET and KARMA8_DB_PASSWORD; docs/operations.md)
up:
    docker compose -f compose/compose.yaml up -d --build
    docker compose -f compose/compose.yaml ps

# Add bucket-9 and bucket-10 to the running service stack
add-buckets:
    docker compose -f compose/compose.yaml -f compose/compose.more-buckets.yaml up -d bucket-9 bucket-10

# Follow the service stack's logs (JSON lines; e.g. just logs api-1)
logs *SERVICES:
    KARMA8_SECRET="${KARMA8_SECRET:-unused-by-logs}" KARMA8_DB_PASSWORD="${KARMA8_DB_PASSWORD:-unused-by-logs}" docker compose -f compose/compose.yaml -f compose/compose.more-buckets.yaml logs -f {{SERVICES}}

# Stop and remove the service stack's containers; the volumes (the data) stay
down:
    KARMA8_SECRET="${KARMA8_SECRET:-unused-by-down}" KARMA8_DB_PASSWORD="${KARMA8_DB_PASSWORD:-unused-by-down}" docker compose -f compose/compose.yaml -f compose/compose.more-buckets.yaml down
