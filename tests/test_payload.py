"""The server never trusts an upload: every kind of malformed payload is rejected by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedbip_flower.federation.payload import Expected, PayloadError, to_record_dict, validate_reply
from fedbip_flower.method.upload import ClientPayload
from tests.helpers import expected

EXP = expected(model_fingerprint="abc")


def _payload(n=6) -> ClientPayload:
    g = torch.Generator().manual_seed(0)
    return ClientPayload(
        latents=torch.randn(n, 4, 16, 16, generator=g).half(),
        labels=torch.tensor([0, 1, 2] * (n // 3)),
        s=torch.randn(1, 16, generator=g),
        v=torch.randn(3, 1, 16, generator=g),
        v_classes=torch.tensor([0, 1, 2]),
        class_names=["a", "b", "c", "d"],
        domain="medical",
        template="a [S] style of a [V]",
        timestep=951,
        injection="input",
        model_fingerprint="abc",
    )


def test_round_trip():
    p = _payload()
    q = validate_reply(to_record_dict(p), EXP)
    for k in ("latents", "labels", "s", "v", "v_classes"):
        assert torch.equal(getattr(p, k), getattr(q, k))
    assert q.class_names == p.class_names and q.timestep == 951 and q.domain == "medical"


def _with_array(key, value):
    rd = to_record_dict(_payload())
    rd["upload"][key] = value if isinstance(value, Array) else Array(value)
    return rd


def _with_meta(key, value):
    rd = to_record_dict(_payload())
    if value is None:
        del rd["meta"][key]
    else:
        rd["meta"][key] = value
    return rd


def _corrupt_bytes():
    rd = to_record_dict(_payload())
    arr = rd["upload"]["s"]
    rd["upload"]["s"] = Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=b"\x93NUMPY garbage")
    return rd


def _no_upload():
    rd = to_record_dict(_payload())
    del rd["upload"]
    return rd


CASES = {
    "missing upload": (_no_upload, "no 'upload'"),
    "missing array": (lambda: _drop("v_classes"), "missing array 'v_classes'"),
    "extra array": (lambda: _with_array("images", np.zeros((2, 3, 32, 32), np.float32)), "unexpected array"),
    "wrong dtype": (lambda: _with_array("latents", np.zeros((6, 4, 16, 16), np.float32)), "dtype float32"),
    "wrong rank": (lambda: _with_array("labels", np.zeros((6, 1), np.int64)), "shape"),
    "wrong latent shape": (
        lambda: _with_array("latents", np.zeros((6, 4, 8, 8), np.float16)),
        "expected \\(4, 16, 16\\)",
    ),
    "count mismatch": (lambda: _with_array("labels", np.zeros(5, np.int64)), "6 latents but 5 labels"),
    "nan": (lambda: _with_array("s", np.full((1, 16), np.nan, np.float32)), "NaN"),
    "inf latents": (lambda: _with_array("latents", np.full((6, 4, 16, 16), np.inf, np.float16)), "NaN or infinite"),
    "label out of range": (lambda: _with_array("labels", np.array([0, 1, 2, 0, 1, 9])), "label ids outside"),
    "negative label": (lambda: _with_array("labels", np.array([0, 1, 2, 0, 1, -1])), "label ids outside"),
    "label without concept": (lambda: _with_array("v_classes", np.array([0, 1, 3])), "no class concept"),
    "duplicate v class": (lambda: _with_array("v_classes", np.array([0, 1, 1])), "distinct"),
    "wrong hidden size": (lambda: _with_array("s", np.zeros((1, 8), np.float32)), "s has shape"),
    "too many tokens": (lambda: _with_array("s", np.zeros((50, 16), np.float32)), "s has shape"),
    "corrupt bytes": (_corrupt_bytes, "cannot be decoded"),
    "other model": (lambda: _with_meta("model-fingerprint", "zzz"), "fingerprint"),
    "missing meta": (lambda: _with_meta("class-names", None), "missing meta field 'class-names'"),
    "meta type": (lambda: _with_meta("timestep", "951"), "timestep.*must be int"),
    "timestep range": (lambda: _with_meta("timestep", 5000), "timestep 5000"),
    "bad template": (lambda: _with_meta("template", "a photo of a [V]"), "template"),
    "bad injection": (lambda: _with_meta("injection", "sideways"), "injection"),
    "duplicate class names": (lambda: _with_meta("class-names", ["a", "a", "b", "c"]), "distinct"),
}


def _drop(key):
    rd = to_record_dict(_payload())
    del rd["upload"][key]
    return rd


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_payload_is_rejected(case):
    make, match = CASES[case]
    with pytest.raises(PayloadError, match=match):
        validate_reply(make(), EXP)


def test_size_caps():
    small = Expected(**{**EXP.__dict__, "max_bytes": 1000})
    with pytest.raises(PayloadError, match="cap"):
        validate_reply(to_record_dict(_payload()), small)
    few = Expected(**{**EXP.__dict__, "max_images": 3})
    with pytest.raises(PayloadError, match="exceed the cap"):
        validate_reply(to_record_dict(_payload()), few)


def test_concept_only_upload_needs_permission():
    p = _payload()
    p.latents = p.latents[:0]
    with pytest.raises(PayloadError, match="0 latents but 6 labels"):
        validate_reply(to_record_dict(p), EXP)
    ok = validate_reply(to_record_dict(p), Expected(**{**EXP.__dict__, "allow_empty_latents": True}))
    assert ok.latents.shape[0] == 0 and ok.labels.numel() == 6


def test_a_pickled_array_is_not_loaded():
    rd = to_record_dict(_payload())
    obj = np.array([{"evil": 1}], dtype=object)
    import io

    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    rd["upload"]["s"] = Array(dtype="float32", shape=(1, 16), stype="numpy.ndarray", data=buf.getvalue())
    with pytest.raises(PayloadError):
        validate_reply(rd, EXP)


def test_missing_meta_record():
    rd = RecordDict({"upload": ArrayRecord(), "other": ConfigRecord()})
    with pytest.raises(PayloadError, match="no 'meta'"):
        validate_reply(rd, EXP)
