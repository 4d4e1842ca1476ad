"""Log setup; only the CLI calls it (library code just logs)."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, role: str) -> None:
    """One line per event on stderr: time, level, role (api, bucket, ...), logger, text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)-7s {role} %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # h2 and hpack log every frame at DEBUG; they are never what an operator wants.
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
