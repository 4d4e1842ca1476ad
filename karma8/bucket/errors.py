"""Errors of a bucket's fragment store (files and volumes alike)."""

from __future__ import annotations

from karma8.errors import Karma8Error


class FragmentMissing(Karma8Error):
    """The bucket does not hold the requested fragment."""

    code = "not_found"


class FragmentCorrupt(Karma8Error):
    """A fragment's data does not match its checksums."""

    code = "checksum_mismatch"


class NoSpace(Karma8Error):
    """The fragment does not fit in the bucket's free space."""

    code = "no_space"
