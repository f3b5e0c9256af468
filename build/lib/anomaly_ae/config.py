"""Building settings dataclasses from parameter dicts, with clear errors for typos."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_settings(cls: type[T], data: dict[str, Any] | None, section: str) -> T:
    """``cls(**data)``, refusing keys that are not fields of ``cls`` and naming the
    parameter section (e.g. ``training``) so the user knows which YAML block to fix."""
    data = dict(data or {})
    unknown, known = unknown_keys(cls, data)
    if unknown:
        raise ValueError(f"Unknown {section} settings {unknown}; known: {known}")
    return cls(**data)


def unknown_keys(cls: type, data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(keys of data that are not fields of cls, the field names)``, both sorted."""
    known = sorted(f.name for f in fields(cls))
    return sorted(set(data) - set(known)), known
