# Sourced by dev.sh and test.sh: create the virtual environment if needed, install
# karma8 into it (with EXTRAS, e.g. "[dev]"), and activate it. KARMA8_VENV picks the
# directory (default .venv).
VENV=${KARMA8_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q -e ".${EXTRAS:-}"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
