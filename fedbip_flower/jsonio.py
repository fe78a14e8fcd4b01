"""Valid JSON only: every JSON file the package writes goes through :func:`write_json`.

JSON has no NaN or infinity (Python's ``json`` writes them as bare ``NaN``/``Infinity``,
which strict readers reject): a value that is not a finite number (a site without test
images has no accuracy) is written as ``null``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as None, tuples as lists, numbers of other types
    (numpy, torch scalars) as Python floats."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return json_safe(obj.item())
    return json_safe(float(obj))


def dumps(obj: Any, indent: int | None = 2, **kwargs) -> str:
    """Strict JSON text of ``obj`` (see :func:`json_safe`)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, indent: int | None = 2, **kwargs) -> Path:
    """Write ``obj`` as strict JSON (a trailing newline); returns the path."""
    path = Path(path)
    path.write_text(dumps(obj, indent=indent, **kwargs) + "\n")
    return path


def loads_strict(text: str) -> Any:
    """Parse JSON, refusing ``NaN``, ``Infinity`` and ``-Infinity``."""

    def refuse(token: str):
        raise ValueError(f"not valid JSON: {token}")

    return json.loads(text, parse_constant=refuse)
