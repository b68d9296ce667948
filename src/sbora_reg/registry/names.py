"""Validation of adapter names, references ``name[@version]`` and tags."""

from __future__ import annotations

import unicodedata

from sbora_reg.errors import InvalidNameError

MAX_NAME = 200


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a safe registry name, else raise InvalidNameError."""
    if not name or not name.strip():
        raise InvalidNameError(f"the {what} is empty: pass a non-empty {what}")
    if len(name) > MAX_NAME:
        raise InvalidNameError(f"the {what} {name[:40]!r}... is longer than {MAX_NAME} characters")
    if name != name.strip():
        raise InvalidNameError(f"the {what} {name!r} starts or ends with whitespace")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise InvalidNameError(f"the {what} {name!r} contains control characters")
    if "/" in name or "\\" in name:
        raise InvalidNameError(f"the {what} {name!r} contains a path separator: use '-' or '_'")
    if ".." in name:
        raise InvalidNameError(f"the {what} {name!r} contains '..'")
    if "@" in name:
        raise InvalidNameError(f"the {what} {name!r} contains '@', which separates the version")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None); ``"name@3"`` -> (name, 3)."""
    name, sep, version_text = ref.rpartition("@") if "@" in ref else (ref, "", "")
    check_name(name)
    if not sep:
        return name, None
    if not version_text.isdigit() or int(version_text) < 1:
        raise InvalidNameError(f"bad version in {ref!r}: write NAME or NAME@VERSION (1, 2, ...)")
    return name, int(version_text)


def check_tags(tags: dict[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        check_name(key, "tag key")
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise InvalidNameError(f"the value of tag {key!r} contains control characters")
        out[key] = value
    return out
