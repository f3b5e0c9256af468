"""Building settings dataclasses from parameter dicts, with clear errors for typos."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_settings(cls: type[T], data: dict[str, Any] | None, section: str) -> T:
    """``cls(**data)``, refusing keys that are not fields of ``cls`` and naming the
    parameter section (e.g. ``training``) so the user knows which YAML block to fix."""
    data = dict(data or {})
    known = sorted(f.name for f in fields(cls))
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"Unknown {section} settings {unknown}; known: {known}")
    return cls(**data)
