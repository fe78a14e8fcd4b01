"""Hostile client replies as hypothesis strategies, and checks that the server's intake
survives them.

:func:`uploads` draws a valid upload for the server's model with 1-4 mutations (records, keys,
dtypes, shapes, header/data disagreements, corrupt bytes, values, strings, types, metrics,
valid-but-odd values, now and then an error reply with a hostile reason);
:func:`evaluation_replies` draws mutated evaluation replies. The checks feed a reply to the
server's intake exactly as a round would (:class:`~fedbip_flower.federation.sites.Sites`) and
say what became of it:

- ``accepted``: and synthesis made its images;
- ``rejected``: with a logged reason naming the node;
- ``guarded``: an unexpected exception inside validation, caught by the per-client guard (the
  node is rejected, but validation should have named the problem);
- ``synth-failed``: accepted, then synthesis failed (validation missed something);
- ``crashed``: an exception escaped the intake (the run would have failed).

``tests/test_fuzz_intake.py`` runs them; ``FEDBIP_FUZZ_EXAMPLES=2000`` runs more.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import strategies as st

from fedbip_flower.config import FedBiPConfig
from fedbip_flower.federation.payload import META, METRICS, UPLOAD, to_record_dict
from fedbip_flower.federation.server_pipeline import synthesize_upload
from fedbip_flower.federation.sites import Sites, expected_for
from fedbip_flower.federation.strategy import FedBiPStrategy
from tests.helpers import Model, honest_payload, instruction

OUTCOMES = ("accepted", "rejected", "guarded", "synth-failed", "crashed")
_DTYPES = ("float16", "float32", "float64", "int64", "int32", "int8", "uint8", "bool", "object", "<U3", "complex64")
CHARS = (
    list("abcxyz ABC019._-/\\")
    + ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\u0085", "\u200b", "\u202e"]
    + ["é", "中", "🙂", "\ud800", "[S]", "[V]", "..", "../", "%s", "{}", "\ufffd", "<|endoftext|>"]
)


class Draws:
    """The mutations' choices, each drawn from hypothesis (so a failing reply shrinks)."""

    def __init__(self, draw):
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def choice(self, seq):
        return seq[self.integer(0, len(seq) - 1)]

    def real(self) -> float:
        special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1e4, 1e3])
        return self.draw(special | st.floats(allow_nan=True, allow_infinity=True))

    def text(self, max_len: int = 40) -> str:
        chars = st.characters(exclude_categories=())  # surrogates and control characters too
        pieces = st.lists(st.sampled_from(CHARS), max_size=max_len).map("".join)  # tokens, paths, escapes
        long = st.sampled_from(CHARS).map(lambda c: c * 1500)
        return self.draw(st.text(alphabet=chars, max_size=max_len) | pieces | long)

    def raw(self, max_len: int = 64) -> bytes:
        return self.draw(st.binary(max_size=max_len))


# ----------------------------------------------------------------------------- values
def _value(src: Draws, depth: int = 0) -> Any:
    """A value of a random type a record may hold (or a wrong type)."""
    kind = src.integer(0, 9 if depth == 0 else 6)
    if kind == 0:
        return src.integer(-(2**63), 2**63 - 1) if src.integer(0, 1) else src.integer(-5, 2000)
    if kind == 1:
        return src.real()
    if kind == 2:
        return src.text()
    if kind == 3:
        return bool(src.integer(0, 1))
    if kind == 4:
        return src.raw()
    if kind == 5:
        return 2**70 * (1 if src.integer(0, 1) else -1)
    if kind == 6:
        return None
    inner = src.integer(0, 3)
    items = [_value(src, depth + 1) for _ in range(src.integer(0, 5))]
    if inner == 0:  # one type, as records allow
        items = [src.text(8) for _ in range(src.integer(0, 5))]
    elif inner == 1:
        items = [src.real() for _ in range(src.integer(0, 5))]
    elif inner == 2:
        items = [src.integer(-10, 10) for _ in range(src.integer(0, 5))]
    return items


def _put(record, key: str, value: Any) -> None:
    """``record[key] = value`` where the record type takes it (others are skipped)."""
    with contextlib.suppress(Exception):
        record[key] = value


def _array(src: Draws, shape: tuple[int, ...], dtype: str) -> Array:
    """An Array of ``shape``/``dtype`` with random (sometimes special) values."""
    n = math.prod(shape)
    np_dtype = np.dtype(dtype)
    if np_dtype.kind == "f":
        data = np.asarray([src.real() for _ in range(min(n, 8))] or [0.0], dtype=np.float64)
        data = (
            np.resize(data, n).astype(np_dtype, copy=False)
            if src.integer(0, 1)
            else (np.random.default_rng(src.integer(0, 2**31)).standard_normal(n).astype(np_dtype))
        )
    elif np_dtype.kind in "iub":
        data = np.random.default_rng(src.integer(0, 2**31)).integers(-3, 12, n).astype(np_dtype)
    elif np_dtype.kind == "c":
        data = np.zeros(n, np_dtype)
    elif np_dtype.kind == "O":
        data = np.asarray([{"evil": 1}] * n + [None])[:n]
    else:
        data = np.asarray(["abc"] * n, dtype=np_dtype)
    data = data.reshape(shape)
    try:
        return Array(data)
    except Exception:  # noqa: BLE001 - object arrays: what a hostile client can still send, as a pickle
        buf = io.BytesIO()
        np.save(buf, data, allow_pickle=True)
        return Array(dtype=str(data.dtype), shape=tuple(data.shape), stype="numpy.ndarray", data=buf.getvalue())


def _shape(src: Draws, like: tuple[int, ...]) -> tuple[int, ...]:
    kind = src.integer(0, 5)
    if kind == 0:  # another rank
        return tuple(src.integer(0, 6) for _ in range(src.integer(0, 5)))
    out = list(like)
    if not out:
        return (src.integer(0, 4),)
    i = src.integer(0, len(out) - 1)
    out[i] = src.choice([0, 1, out[i] - 1, out[i] + 1, out[i] * 2, 3])
    return tuple(max(0, d) for d in out)


# ----------------------------------------------------------------------------- mutations
def _upload(rd: RecordDict) -> ArrayRecord | None:
    return rd.array_records.get(UPLOAD)


def m_drop_record(src: Draws, rd: RecordDict, model: Model) -> None:
    names = list(rd.keys())
    if names:
        del rd[src.choice(names)]


def m_swap_record(src: Draws, rd: RecordDict, model: Model) -> None:
    """A record of the wrong type under a known name, or an extra record."""
    name = src.choice([UPLOAD, META, METRICS, src.text(12) or "x"])
    kind = src.integer(0, 2)
    if kind == 0:
        rec = ConfigRecord()
        _put(rec, "a", _value(src))
    elif kind == 1:
        rec = MetricRecord()
        _put(rec, "a", src.real())
    else:
        rec = ArrayRecord({"a": _array(src, (2, 2), "float32")})
    with contextlib.suppress(Exception):
        rd[name] = rec


def m_array_key(src: Draws, rd: RecordDict, model: Model) -> None:
    up = _upload(rd)
    if up is None:
        return
    keys = list(up.keys())
    if keys and src.integer(0, 1):
        del up[src.choice(keys)]
    else:
        up[src.choice(["images", "pixels", src.text(10) or "k", *keys])] = _array(src, (2, 3), "float32")


def m_array_dtype(src: Draws, rd: RecordDict, model: Model) -> None:
    up = _upload(rd)
    if up is None or not len(up):
        return
    key = src.choice(list(up.keys()))
    up[key] = _array(src, tuple(up[key].shape), src.choice(_DTYPES))


def m_array_shape(src: Draws, rd: RecordDict, model: Model) -> None:
    up = _upload(rd)
    if up is None or not len(up):
        return
    key = src.choice(list(up.keys()))
    arr = up[key]
    up[key] = _array(src, _shape(src, tuple(arr.shape)), arr.dtype if arr.dtype in _DTYPES else "float32")


def m_array_header(src: Draws, rd: RecordDict, model: Model) -> None:
    """Header and bytes that disagree: another shape/dtype/stype, truncated or random bytes."""
    up = _upload(rd)
    if up is None or not len(up):
        return
    key = src.choice(list(up.keys()))
    arr = up[key]
    dtype, shape, stype, data = arr.dtype, tuple(arr.shape), arr.stype, bytes(arr.data)
    kind = src.integer(0, 5)
    if kind == 0:
        shape = _shape(src, shape)
    elif kind == 1:
        dtype = src.choice([*_DTYPES, src.text(6)])
    elif kind == 2:
        stype = src.choice(["torch.Tensor", "", src.text(8)])
    elif kind == 3:
        data = data[: src.integer(0, len(data))]
    elif kind == 4:
        data = src.raw(200)
    else:
        buf = bytearray(data)
        for _ in range(src.integer(1, 8)):
            if buf:
                buf[src.integer(0, len(buf) - 1)] = src.integer(0, 255)
        data = bytes(buf)
    with contextlib.suppress(Exception):
        up[key] = Array(dtype=dtype, shape=shape, stype=stype, data=data)


def m_array_values(src: Draws, rd: RecordDict, model: Model) -> None:
    """Same header, other values: special floats, ids out of range, duplicates."""
    up = _upload(rd)
    if up is None or not len(up):
        return
    key = src.choice(list(up.keys()))
    try:
        data = np.array(up[key].numpy(), copy=True)
    except Exception:  # noqa: BLE001 - already corrupt
        return
    if data.size == 0:
        return
    flat = data.reshape(-1)
    for _ in range(src.integer(1, 4)):
        i = src.integer(0, flat.size - 1)
        with contextlib.suppress(OverflowError, ValueError):  # a value the dtype cannot hold: skip it
            if flat.dtype.kind == "f":
                flat[i] = src.real()
            elif flat.dtype.kind in "iu":
                flat[i] = src.choice([-1, len(model.class_names), 2**62, -(2**62), 0, 1, int(flat[0])])
    up[key] = Array(flat.reshape(data.shape))


def m_meta_value(src: Draws, rd: RecordDict, model: Model) -> None:
    meta = rd.config_records.get(META)
    if meta is None:
        return
    keys = ["class-names", "domain", "template", "timestep", "injection", "model-fingerprint", "num-examples"]
    key = src.choice(keys + [src.text(10) or "k"])
    kind = src.integer(0, 3)
    if kind == 0 and key in meta:
        del meta[key]
    elif kind == 1:
        _put(meta, key, _value(src))
    else:
        _put(meta, key, _plausible(src, key, model))


def _plausible(src: Draws, key: str, model: Model) -> Any:
    """A value of the right type that may still be wrong (or right but odd)."""
    if key == "class-names":
        kind = src.integer(0, 5)
        names = list(model.class_names)
        if kind == 0:
            return []
        if kind == 1:
            return names + [names[0]]
        if kind == 2:
            return [f"n{i}" for i in range(src.choice([1, 2, 10001, 20000]))]
        if kind == 3:
            names[src.integer(0, len(names) - 1)] = src.text(300)
            return names
        if kind == 4:
            return names[: src.integer(1, len(names))]
        return names + [src.text(20) for _ in range(src.integer(1, 3))]
    if key == "template":
        kind = src.integer(0, 4)
        if kind == 0:
            words = [src.choice(["photo", "zebra", "of", "x"]) for _ in range(src.integer(5, 60))]
            return "a [S] " + " ".join(words) + " [V]"
        if kind == 1:
            return src.text(30) + "[S]" + src.text(30) + "[V]" + src.text(30)
        if kind == 2:
            return src.choice(["[S][V]", "[V] [S]", "[S] [S] [V]", "[S]", "", "[V]"])
        if kind == 3:
            return "[S] " + "a" * src.integer(10, 1200) + " [V]"
        return "a [S] style of a [V]"
    if key == "timestep":
        return src.choice([-1, 0, 1, 999, 1000, 2**62, model.timestep, src.integer(0, 999)])
    if key == "injection":
        return src.choice(["input", "output", "Input", "", src.text(8)])
    if key == "model-fingerprint":
        return src.choice([model.fingerprint, model.fingerprint + "x", "", src.text(40)])
    if key == "domain":
        return src.choice(
            [
                "../../etc/passwd",
                "/abs",
                "a/b\\c",
                "x\x00y",
                "é" * 200,
                "🙂" * 100,
                "",
                ".",
                "..",
                "d" * 201,
                src.text(60),
            ]
        )
    return _value(src)


def m_metrics(src: Draws, rd: RecordDict, model: Model) -> None:
    rec = rd.metric_records.get(METRICS)
    if rec is None:
        rec = MetricRecord()
        with contextlib.suppress(Exception):
            rd[METRICS] = rec
    kind = src.integer(0, 3)
    if kind == 0:
        for i in range(src.choice([1, 70, 200])):
            _put(rec, f"m{i}", float(i))
    else:
        key = src.choice(["loss-first", "num-train", src.text(100) or "k"])
        _put(rec, key, src.choice([[1.0, 2.0], [1, 2], src.real(), 2**70, src.integer(-5, 5), []]))


def m_string_everywhere(src: Draws, rd: RecordDict, model: Model) -> None:
    """Hostile text in the strings synthesis and the outputs use."""
    meta = rd.config_records.get(META)
    if meta is None:
        return
    key = src.choice(["domain", "template", "class-names"])
    if key == "class-names":
        names = list(model.class_names)
        names[src.integer(0, len(names) - 1)] = src.text(60)
        _put(meta, key, names)
    elif key == "template":
        _put(meta, key, src.text(20) + "[S]" + src.text(20) + "[V]" + src.text(20))
    else:
        _put(meta, key, src.text(80))


def m_benign(src: Draws, rd: RecordDict, model: Model) -> None:
    """Valid but unusual: what an odd yet honest client may send (synthesis must cope)."""
    meta, up = rd.config_records.get(META), _upload(rd)
    if meta is None or up is None:
        return
    kind = src.integer(0, 7)
    g = torch.Generator().manual_seed(src.integer(0, 2**31))
    if kind == 0:
        _put(meta, "domain", "".join(ch for ch in src.text(60) if ch.isprintable())[:200])
    elif kind == 1:
        _put(meta, "template", src.choice(["[S][V]", "[V] in [S]", "a photo of a [V] in the style [S] .", "[S] [V]"]))
    elif kind == 2:
        _put(meta, "timestep", src.integer(0, 999))
    elif kind == 3:
        _put(meta, "injection", src.choice(["input", "output"]))
    elif kind == 4 and "s" in up:  # up to 8 domain tokens
        up["s"] = Array((torch.randn(src.integer(1, 8), model.hidden, generator=g) * 50).numpy())
    elif kind == 5 and "v" in up and "v_classes" in up:  # up to 8 tokens per class
        k = int(up["v_classes"].shape[0])
        up["v"] = Array(torch.randn(k, src.integer(1, 8), model.hidden, generator=g).numpy())
    elif kind == 6 and "latents" in up:
        with contextlib.suppress(Exception):  # already corrupt: leave it
            z = up["latents"].numpy().astype(np.float32) * src.choice([0.0, 1.0, 100.0, 999.0])
            up["latents"] = Array(np.clip(z, -999, 999).astype(np.float16))
    else:
        names = list(model.class_names)
        names[src.integer(0, len(names) - 1)] = "".join(ch for ch in src.text(30) if ch.isprintable()) or "x"
        if len(set(names)) == len(names):
            _put(meta, "class-names", names)


MUTATIONS = (
    m_drop_record,
    m_swap_record,
    m_array_key,
    m_array_dtype,
    m_array_shape,
    m_array_header,
    m_array_values,
    m_meta_value,
    m_metrics,
    m_string_everywhere,
)


def _fuzzed_upload(src: Draws, model: Model) -> RecordDict | Error:
    """A mutated upload (or, now and then, an error reply with a hostile reason)."""
    if src.integer(0, 24) == 0:
        return Error(code=src.choice([0, 2, 3, -1, 2**31]), reason=src.text(500))
    rd = to_record_dict(honest_payload(model, src.integer(0, 2**16), n=src.integer(1, 8)))
    pool = (m_benign,) if src.integer(0, 3) == 0 else (*MUTATIONS, m_benign)
    for _ in range(src.integer(1, 4)):
        mutation = src.choice(pool)
        try:
            mutation(src, rd, model)
        except Exception:  # noqa: BLE001 - a mutation the record types refuse: skipped
            pass
    return rd


def _fuzzed_evaluation(src: Draws) -> RecordDict | Error:
    """A mutated evaluation reply."""
    if src.integer(0, 9) == 0:
        return Error(code=2, reason=src.text(300))
    rd = RecordDict()
    if src.integer(0, 5):
        m = MetricRecord()
        for key in ("accuracy", "num-examples"):
            kind = src.integer(0, 3)
            if kind == 0:
                continue
            value = {1: 0.5 if key == "accuracy" else 10, 2: src.real()}.get(kind)
            _put(m, key, value if kind < 3 else src.choice([[0.5], 2**70, -3, [], src.integer(-5, 5)]))
        with contextlib.suppress(Exception):
            rd[src.choice(["metrics", "metrics", "other"])] = m
    if src.integer(0, 1):
        c = ConfigRecord()
        _put(c, "domain", src.choice([src.text(40), 5, ["x"]]))
        with contextlib.suppress(Exception):
            rd[META] = c
    return rd


@st.composite
def uploads(draw, model: Model) -> RecordDict | Error:
    """A mutated upload for ``model`` (or, now and then, an error reply)."""
    return _fuzzed_upload(Draws(draw), model)


@st.composite
def evaluation_replies(draw) -> RecordDict | Error:
    """A mutated evaluation reply (or an error reply)."""
    return _fuzzed_evaluation(Draws(draw))


# ----------------------------------------------------------------------------- checks
class _Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def check_upload(components, cfg: FedBiPConfig, nid: int, content: RecordDict | Error) -> tuple[str, str]:
    """Feed ``content`` to a fresh intake as node ``nid``'s only upload; synthesize it if
    accepted. Returns (outcome, detail)."""
    sites = Sites(expected_for(components, cfg), 1)
    msg = instruction(nid)
    sites.instruct([msg], "train")
    catch = _Catch()
    logging.getLogger("fedbip_flower").addHandler(catch)
    try:
        try:
            sites.collect([Message(content, reply_to=msg)])
        except Exception as err:  # noqa: BLE001 - what the fuzzing looks for
            return "crashed", f"intake: {type(err).__name__}: {err}"
        rec = sites.clients.get(nid)
        if rec is None:
            return "crashed", "the node's record vanished"
        if rec.status == "rejected":
            if not any(f"node {nid}" in line for line in catch.lines):
                return "crashed", f"rejection without a log line naming node {nid}: {rec.reason}"
            return ("guarded" if rec.reason.startswith("unreadable upload") else "rejected"), rec.reason
        if rec.status != "accepted":
            return "crashed", f"status {rec.status!r}"
        try:
            x, y = synthesize_upload(components, sites.accepted[nid], cfg, seed=0)
        except Exception as err:  # noqa: BLE001
            return "synth-failed", f"synthesis: {type(err).__name__}: {err}"
        if x.dtype != torch.uint8 or len(x) != len(y) or len(y) == 0:
            return "synth-failed", f"synthesis returned {tuple(x.shape)} images for {len(y)} labels"
        return "accepted", ""
    finally:
        logging.getLogger("fedbip_flower").removeHandler(catch)


def check_evaluation(components, cfg: FedBiPConfig, nid: int, content: RecordDict | Error) -> tuple[str, str]:
    """Feed ``content`` as the evaluation reply of node ``nid`` (an accepted site)."""
    sites = Sites(expected_for(components, cfg), 1)
    sites.instruct([instruction(nid)], "train")
    sites.clients[nid].status = "accepted"
    msg = instruction(nid, "evaluate")
    sites.instruct([msg], "evaluate")
    try:
        sites.score([Message(content, reply_to=msg)])
    except Exception as err:  # noqa: BLE001
        return "crashed", f"evaluation: {type(err).__name__}: {err}"
    rec = sites.clients[nid]
    if rec.accuracy is not None and not (0.0 <= rec.accuracy <= 1.0 and rec.num_test > 0):
        return "crashed", f"recorded an impossible score {rec.accuracy} on {rec.num_test}"
    return ("accepted" if rec.accuracy is not None else "rejected"), rec.evaluation


def check_full_round(components, cfg: FedBiPConfig, model: Model, content: RecordDict | Error) -> tuple[str, str]:
    """A whole ``aggregate_train`` (synthesis and classifier) with ``content`` beside two honest
    uploads (``cfg.min_clients`` must be at most 2)."""
    strategy = FedBiPStrategy(cfg, components, progress=False)
    msgs = {nid: instruction(nid) for nid in (1, 2, 3)}
    strategy.sites.instruct(list(msgs.values()), "train")
    honest = [(1, "medical"), (2, "thermal")]
    replies = [Message(to_record_dict(honest_payload(model, k, domain=d)), reply_to=msgs[k]) for k, d in honest]
    replies.append(Message(content, reply_to=msgs[3]))
    try:
        arrays, _ = strategy.aggregate_train(1, replies)
    except Exception as err:  # noqa: BLE001
        return "crashed", f"aggregate_train: {type(err).__name__}: {err}"
    clients = strategy.sites.clients
    if clients[1].status != "accepted" or clients[2].status != "accepted" or not len(arrays):
        return "crashed", "the honest clients did not make it through the round"
    return "accepted", ""
