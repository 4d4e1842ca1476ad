"""docs/configuration.md documents every setting, with its environment variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from karma8.config import SECTIONS

DOC = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize(("section", "key"), [(cls, key) for cls in SECTIONS for key in cls.model_fields])
def test_every_key_is_documented(section: type, key: str) -> None:
    env = f"{section.env_prefix}{key.upper()}"  # type: ignore[attr-defined]
    assert f"| `{key}` | `{env}`" in DOC, f"{env} missing from docs/configuration.md"
    for alias, field in section.env_aliases.items():  # type: ignore[attr-defined]
        if field == key:
            assert f"`{alias}`" in DOC, f"{alias} missing from docs/configuration.md"


def test_no_removed_key_is_documented() -> None:
    documented = {
        line.split("`")[3] for line in DOC.splitlines() if line.startswith("| `") and "KARMA8_" in line
    }
    known = {f"{cls.env_prefix}{key.upper()}" for cls in SECTIONS for key in cls.model_fields}
    assert documented <= known, f"documented but not a setting: {sorted(documented - known)}"
