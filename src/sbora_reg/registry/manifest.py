"""What ``compose`` writes beside the weights, and ``audit`` reads back: the manifest, the card.

``sbora_manifest.json`` lists the members and the regions each declares (indices as ranges; see
docs/FORMAT.md); ``README.md`` is a model card whose YAML front matter names the base. Torch
free: members are read through their ``adapter.modules`` (variant, kind, shape, indices).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbora_reg import __version__
from sbora_reg.errors import AdapterFormatError

if TYPE_CHECKING:
    from sbora_reg.registry.overlap import RegionLike

MANIFEST_NAME = "sbora_manifest.json"
MANIFEST_FORMAT = "sbora-manifest"
CARD_NAME = "README.md"
# compose's output formats: a merged checkpoint, one multi-task SBoRA adapter, one PEFT adapter
FORMATS = ("merged", "adapter", "peft")
OUT_DTYPE_NAMES = ("float32", "bfloat16", "float16")  # merged weights may be cast to these


def member_ref(member: Any) -> str:
    """``name@version`` (or ``name`` for a member that is not registered)."""
    return member.name if member.version is None else f"{member.name}@{member.version}"


def manifest(
    members: Sequence[Any],
    allow_overlap: bool,
    fingerprint: str | None,
    calibration: dict[str, Any] | None = None,
) -> dict:
    """``sbora_manifest.json``: members and the regions they declare (read by ``audit``), and
    how their factors were calibrated when they were (``registry.calibration``)."""
    from sbora_reg.registry.ranges import format_ranges

    rows = []
    for member in members:
        regions = {
            name: {
                "variant": m.variant,
                "kind": m.kind,
                "shape": list(m.shape),
                "indices": None if m.indices is None else format_ranges(m.indices.numpy()),
            }
            for name, m in sorted(member.adapter.modules.items())
        }
        rows.append(
            {"name": member.name, "version": member.version, "sha256": member.sha256,
             "regions": regions}
        )  # fmt: skip
    out = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "tool_version": __version__,
        "base_fingerprint": fingerprint,
        "allow_overlap": allow_overlap,
        "members": rows,
    }
    if calibration is not None:
        out["calibration"] = calibration
    return out


def read_calibration(checkpoint: str | Path) -> dict[str, Any] | None:
    """The ``calibration`` entry of a compose output's manifest (None when there is none)."""
    path = Path(checkpoint) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"{path} is not a readable sbora manifest: {exc}") from None
    found = data.get("calibration") if isinstance(data, dict) else None
    return found if isinstance(found, dict) else None


def model_card(
    members: Sequence[Any],
    base_model: str,
    fmt: str,
    command: str,
    measurements: Sequence[dict[str, Any]] = (),
    calibration: dict[str, Any] | None = None,
) -> str:
    """README.md with YAML front matter naming the base and every member, how they were
    calibrated, and, when members were measured (``RetentionRow.to_json()`` rows), how much of
    each skill survived."""
    tags = ["sbora", "sbora-reg", "merge" if fmt == "merged" else "lora"]
    lines = ["---", f"base_model: {json.dumps(base_model)}", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", "# Composed SBoRA model", ""]
    lines += [
        f"{len(members)} SBoRA task adapters composed by sbora-reg {__version__} "
        f"(format `{fmt}`) onto `{base_model}`.",
        "",
        "| member | version | modules | sha256 |",
        "|---|---|---|---|",
    ]
    for m in members:
        v = "" if m.version is None else m.version
        lines.append(f"| {m.name} | {v} | {len(m.adapter.modules)} | `{m.sha256 or ''}` |")
    applied = calibration is not None and calibration.get("method", "none") != "none"
    if calibration is not None:
        lines += [""]
        if applied:
            lines.append(
                f"Calibrated (`{calibration['method']}`): each member's factors re-solved on its "
                "region so that the sum reproduces every member's own update on all members' "
                "probe inputs (even probe rows; the odd rows are held out)."
            )
        else:
            lines.append(f"Not calibrated: {calibration.get('reason') or 'asked for none'}.")
    if measurements:
        where = "; probe sets: the rows calibration did not read" if applied else ""
        lines += [
            "",
            f"How much of each member's skill survived (exact match{where}):",
            "",
        ]
        lines += [
            "| member | base | alone | composed | kept | prompts |",
            "|---|---|---|---|---|---|",
        ]
        for row in measurements:
            kept = row["exact_retention"]
            lines.append(
                f"| {row['member']} | {row['base']['exact']:.2f} | {row['alone']['exact']:.2f} | "
                f"{row['composed']['exact']:.2f} | {'n/a' if kept is None else f'{kept:.2f}'} | "
                f"{row['examples']} |"
            )
    lines += ["", "Regions per member: `sbora_manifest.json`.", "", "Command:", "", "```"]
    lines += [command, "```", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class DeclaredRegion:
    """A region some source declares: where it came from, the module kind, the region."""

    source: str  # "manifest:name@1" or "registry:name@1"
    kind: str | None  # "linear" | "conv1d" | None (unknown: decided from the stored shape)
    region: RegionLike


def read_manifest(checkpoint: str | Path) -> dict[str, list[DeclaredRegion]] | None:
    """Declared regions of ``sbora_manifest.json`` in a checkpoint (None when it has none)."""
    # numpy and the region types only when a manifest is read (the CLI imports this module)
    import numpy as np

    from sbora_reg.registry.ranges import parse_ranges
    from sbora_reg.registry.records import Region

    empty = np.zeros(0, dtype=np.int64)
    path = Path(checkpoint) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}")
        declared: dict[str, list[DeclaredRegion]] = {}
        for member in data["members"]:
            version = member.get("version")
            ref = member["name"] if version is None else f"{member['name']}@{version}"
            for module, spec in member["regions"].items():
                shape = (int(spec["shape"][0]), int(spec["shape"][1]))
                variant = spec["variant"]
                if variant not in ("fa", "fb", "lora"):
                    raise ValueError(f"unknown variant {variant!r} for {module}")
                dim = shape[1] if variant == "fa" else shape[0]
                text = spec.get("indices")
                idx = empty if variant == "lora" or text is None else parse_ranges(text, size=dim)
                declared.setdefault(module, []).append(
                    DeclaredRegion(f"manifest:{ref}", spec.get("kind"), Region(variant, shape, idx))
                )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterFormatError(f"cannot read {path}: {exc}") from exc
    return declared
