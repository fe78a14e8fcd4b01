"""Valid JSON everywhere: what the package writes and what docs/ holds (no NaN, no Infinity)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedbip_flower.jsonio import json_safe, loads_strict, write_json

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_non_finite_numbers_are_written_as_null(tmp_path):
    path = write_json(tmp_path / "x.json", {"a": math.nan, "b": [math.inf, -math.inf, 0.5], "c": (1, 2)})
    assert loads_strict(path.read_text()) == {"a": None, "b": [None, None, 0.5], "c": [1, 2]}
    with pytest.raises(ValueError, match="NaN"):
        loads_strict(json.dumps({"a": math.nan}))  # Python's own json would write it


def test_numpy_and_torch_scalars_become_numbers():
    import numpy as np
    import torch

    assert json_safe({"n": np.float32(0.25), "t": torch.tensor(3), "bad": np.float64("nan")}) == {
        "n": 0.25,
        "t": 3,
        "bad": None,
    }


@pytest.mark.parametrize("path", sorted(DOCS.rglob("*.json")), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_json_in_docs_is_valid(path):
    loads_strict(path.read_text())


def test_the_package_writes_json_only_through_write_json():
    """No module writes a file from ``json.dumps`` directly (strings for hashing are fine)."""
    package = DOCS.parent / "fedbip_flower"
    offenders = []
    for f in sorted(package.rglob("*.py")):
        for k, line in enumerate(f.read_text().splitlines(), 1):
            if "write_text(json.dumps" in line or "json.dump(" in line:
                offenders.append(f"{f.relative_to(package.parent)}:{k}")
    assert not offenders, offenders
