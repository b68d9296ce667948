"""Validation of adapter names, references ``name[@version]``, tags and Hub repo ids."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

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


# One part of a Hub repo id ``owner/name``: what the Hub accepts (no "--" or ".." inside).
_HUB_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


def check_hub_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is one part of a Hub id (what the Hub accepts as a repo name)."""
    if not (_HUB_PART.fullmatch(name) and "--" not in name and ".." not in name):
        raise InvalidNameError(
            f"the {what} {name!r} is not allowed: use letters, digits and '-', '_', '.' (at most "
            "96 characters, starting and ending with a letter or digit)"
        )
    return name


def check_hub_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a Hub model id ``owner/name``, else raise InvalidNameError."""
    owner, sep, name = repo_id.partition("/")
    parts_ok = all(
        _HUB_PART.fullmatch(p) and "--" not in p and ".." not in p for p in (owner, name)
    )
    if not sep or "/" in name or not parts_ok:
        raise InvalidNameError(
            f"{repo_id!r} is not a Hub id: write OWNER/NAME, each part letters, digits and "
            "'-', '_', '.' (at most 96 characters, starting and ending with a letter or digit)"
        )
    return repo_id


def hub_id_from_config(model_dir: Path) -> str | None:
    """The config's ``_name_or_path`` when it is a Hub id (``owner/name``), else None."""
    try:
        value = json.loads((model_dir / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(value, str) or value.startswith((".", "/", "~")):
        return None
    try:
        return check_hub_id(value)
    except InvalidNameError:
        return None
