"""Validation of adapter names, references ``name[@version]``, tags and Hub repo ids."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from sbora_reg.errors import InvalidNameError

MAX_NAME = 96
# Names of adapters, tasks and tag keys: the Hub's repo-name grammar, so every name can be pushed.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ALLOWED = (
    "letters, digits and '-', '_', '.', starting with a letter or digit, at most "
    f"{MAX_NAME} characters"
)


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a registry name (``[A-Za-z0-9][A-Za-z0-9._-]*``, at most
    ``MAX_NAME`` characters: what the Hub accepts), else raise InvalidNameError saying why."""
    if not name:
        raise InvalidNameError(f"the {what} is empty: use {ALLOWED}")
    if len(name) > MAX_NAME:
        raise InvalidNameError(f"the {what} {name[:40]!r}... is too long: use {ALLOWED}")
    if not _NAME.fullmatch(name):
        bad = next((c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c)), name[0])
        raise InvalidNameError(f"the {what} {name!r} may not contain {bad!r}: use {ALLOWED}")
    if ".." in name:
        raise InvalidNameError(f"the {what} {name!r} may not contain '..': use {ALLOWED}")
    return name


def _check_ref_name(name: str) -> str:
    """A name as a reference may spell it. Registries made before the grammar may hold names
    outside it (with spaces, say), so a reference is held to the rules every stored name has
    always met: not empty, no control characters, no path separator, '..' or '@'."""
    if (
        not name
        or name != name.strip()
        or any(unicodedata.category(c).startswith("C") for c in name)
        or any(part in name for part in ("/", "\\", "..", "@"))
    ):
        raise InvalidNameError(f"{name!r} is not an adapter name: names use {ALLOWED}")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None); ``"name@3"`` -> (name, 3)."""
    name, sep, version_text = ref.rpartition("@") if "@" in ref else (ref, "", "")
    _check_ref_name(name)
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
