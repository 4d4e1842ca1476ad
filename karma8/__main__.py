"""``python -m karma8``: the same as the ``karma8`` command."""

from karma8.cli import main

main()
