"""Building config dataclasses from recipe mappings, with one-line errors."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from compress.errors import CompressError


def build_config(cls, data: Optional[Any], section: str):
    """`cls(**data)` for a recipe section; None gives the defaults. A non-mapping or an
    unknown key is a CompressError naming the section and the valid keys."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise CompressError(f"{section}: expected a mapping, got {data!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in valid:
            raise CompressError(f"{section}.{key}: unknown key; valid keys: {', '.join(valid)}")
    return cls(**data)
