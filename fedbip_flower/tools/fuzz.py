"""Fuzzing of the server's intake: mutated client replies against the real strategy.

Every fuzzed reply starts from a valid upload for the server's model and gets 1-4 random
mutations (records, keys, dtypes, shapes, header/data disagreements, corrupt bytes, values,
strings, types, metrics, error replies). It is fed to :class:`FedBiPStrategy` exactly as a
round's reply would be (``_collect``: the per-client guard and validation); an accepted
reply then goes through synthesis of that client's images. Evaluation replies are fuzzed
the same way through ``aggregate_evaluate``, and every ``--full-every`` replies a whole
``aggregate_train`` runs with the fuzzed reply beside two honest ones (synthesis and the
classifier included).

Outcomes per reply: ``accepted`` (and synthesis produced its images), ``rejected`` (with a
logged reason naming the node), ``guarded`` (an unexpected exception inside validation,
caught by the per-client guard: the node is rejected, but validation should have named the
problem), ``synth-failed`` (accepted, then synthesis failed: validation missed something)
and ``crashed`` (an exception escaped the strategy: the run would have failed).

    python -m fedbip_flower.tools.fuzz --replies 2000            # the bundled LDM, seed 0

The random choices come from a :class:`Source`; tests drive the same mutations from
hypothesis (``tests/test_fuzz_intake.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import random
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedbip_flower.federation.payload import META, METRICS, UPLOAD, to_record_dict
from fedbip_flower.method.upload import ClientPayload

log = logging.getLogger(__name__)
SKIPPED: Counter = Counter()  # mutations that could not be applied (the record types refused them)
OUTCOMES = ("accepted", "rejected", "guarded", "synth-failed", "crashed")
_DTYPES = ("float16", "float32", "float64", "int64", "int32", "int8", "uint8", "bool", "object", "<U3", "complex64")
_CHARS = (
    list("abcxyz ABC019._-/\\")
    + ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\u0085", "\u200b", "\u202e"]
    + ["é", "中", "🙂", "\ud800", "[S]", "[V]", "..", "../", "%s", "{}", "\ufffd", "<|endoftext|>"]
)


class Source:
    """Random choices: ``integer``, ``choice``, ``real``, ``text``, ``raw`` (bytes)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self.integer(0, len(seq) - 1)]

    def real(self) -> float:
        kind = self.integer(0, 5)
        if kind == 0:
            return self.choice([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1e4, 1e3])
        if kind == 1:
            return float(self.integer(-(2**40), 2**40))
        return self.rng.uniform(-10, 10) * 10 ** self.integer(-3, 5)

    def text(self, max_len: int = 40) -> str:
        if self.integer(0, 9) == 0:
            return self.choice(_CHARS) * self.integer(1, 3000)
        return "".join(self.choice(_CHARS) for _ in range(self.integer(0, max_len)))

    def raw(self, max_len: int = 64) -> bytes:
        return bytes(self.integer(0, 255) for _ in range(self.integer(0, max_len)))


@dataclass
class Model:
    """What an honest upload needs to know about the server's model."""

    fingerprint: str
    channels: int
    size: int
    hidden: int
    timestep: int = 500
    class_names: list[str] = field(default_factory=lambda: [f"class{i}" for i in range(5)])
    # The text encoder's token-embedding table (vocabulary, hidden): honest concepts start at
    # their words' vectors and stay near them (the server screens for that); None: random.
    embeddings: torch.Tensor | None = field(default=None, compare=False, repr=False)
    tokenizer: object = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, components, resolution: int) -> Model:
        return cls(
            components.fingerprint,
            components.latent_channels,
            resolution // components.vae_factor,
            components.hidden_size,
            embeddings=components.text_encoder.get_input_embeddings().weight.detach().float().cpu(),
            tokenizer=components.tokenizer,
        )

    def word(self, text: str) -> torch.Tensor:
        """The token embedding of ``text``'s first token (needs ``embeddings``)."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids or [0]
        return self.embeddings[ids[0]]


def honest_payload(model: Model, seed: int, n: int = 6, domain: str = "medical") -> ClientPayload:
    """A valid upload (random numbers of the right shapes) for ``model``."""
    g = torch.Generator().manual_seed(seed)
    k = len(model.class_names)
    labels = torch.arange(n) % min(k, 3)
    classes = labels.unique()
    latents = torch.randn(n, model.channels, model.size, model.size, generator=g).half()
    s = torch.randn(1, model.hidden, generator=g)
    v = torch.randn(len(classes), 1, model.hidden, generator=g)
    if model.embeddings is not None:  # concepts as honest training leaves them: near the words
        words = torch.stack([model.word(model.class_names[int(c)]) for c in classes])[:, None]
        v = words + 0.2 * words.norm(dim=-1, keepdim=True) * v / model.hidden**0.5
        s = 0.5 * model.word(domain).norm() * s / model.hidden**0.5
    return ClientPayload(
        latents=latents,
        labels=labels,
        s=s,
        v=v,
        v_classes=classes,
        class_names=list(model.class_names),
        domain=domain,
        template="a [S] style of a [V]",
        timestep=model.timestep,
        injection="input",
        model_fingerprint=model.fingerprint,
        metrics={"loss-first": 0.5, "num-train": float(n)},
    )


# ----------------------------------------------------------------------------- values
def _value(src: Source, depth: int = 0) -> Any:
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


def _array(src: Source, shape: tuple[int, ...], dtype: str) -> Array:
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


def _shape(src: Source, like: tuple[int, ...]) -> tuple[int, ...]:
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


def m_drop_record(src: Source, rd: RecordDict, model: Model) -> None:
    names = list(rd.keys())
    if names:
        del rd[src.choice(names)]


def m_swap_record(src: Source, rd: RecordDict, model: Model) -> None:
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


def m_array_key(src: Source, rd: RecordDict, model: Model) -> None:
    up = _upload(rd)
    if up is None:
        return
    keys = list(up.keys())
    if keys and src.integer(0, 1):
        del up[src.choice(keys)]
    else:
        up[src.choice(["images", "pixels", src.text(10) or "k", *keys])] = _array(src, (2, 3), "float32")


def m_array_dtype(src: Source, rd: RecordDict, model: Model) -> None:
    up = _upload(rd)
    if up is None or not len(up):
        return
    key = src.choice(list(up.keys()))
    up[key] = _array(src, tuple(up[key].shape), src.choice(_DTYPES))


def m_array_shape(src: Source, rd: RecordDict, model: Model) -> None:
    up = _upload(rd)
    if up is None or not len(up):
        return
    key = src.choice(list(up.keys()))
    arr = up[key]
    up[key] = _array(src, _shape(src, tuple(arr.shape)), arr.dtype if arr.dtype in _DTYPES else "float32")


def m_array_header(src: Source, rd: RecordDict, model: Model) -> None:
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


def m_array_values(src: Source, rd: RecordDict, model: Model) -> None:
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


def m_meta_value(src: Source, rd: RecordDict, model: Model) -> None:
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


def _plausible(src: Source, key: str, model: Model) -> Any:
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


def m_metrics(src: Source, rd: RecordDict, model: Model) -> None:
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


def m_string_everywhere(src: Source, rd: RecordDict, model: Model) -> None:
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


def m_benign(src: Source, rd: RecordDict, model: Model) -> None:
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


def fuzzed_content(src: Source, model: Model, seed: int) -> RecordDict | Error:
    """A mutated upload (or, now and then, an error reply with a hostile reason)."""
    if src.integer(0, 24) == 0:
        return Error(code=src.choice([0, 2, 3, -1, 2**31]), reason=src.text(500))
    rd = to_record_dict(honest_payload(model, seed, n=src.integer(1, 8)))
    pool = (m_benign,) if src.integer(0, 3) == 0 else (*MUTATIONS, m_benign)
    for _ in range(src.integer(1, 4)):
        mutation = src.choice(pool)
        try:
            mutation(src, rd, model)
        except Exception:  # noqa: BLE001 - a mutation the record types refuse: skipped, counted
            SKIPPED[mutation.__name__] += 1
    return rd


def fuzzed_evaluation(src: Source) -> RecordDict | Error:
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


# ----------------------------------------------------------------------------- driving the strategy
class _Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


_ids = iter(range(1, 2**62))


def instruction(nid: int, kind: str = "train", content: RecordDict | None = None) -> Message:
    """A server->node message with the metadata the SuperLink would give it (also the fake
    Grid's, in the tests)."""
    md = Metadata(
        run_id=1,
        message_id=f"fuzz{next(_ids)}",
        src_node_id=1,
        dst_node_id=nid,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600,
        message_type=kind,
    )
    return Message(content=content if content is not None else RecordDict(), metadata=md)


def _reply(content: RecordDict | Error, to: Message) -> Message:
    return Message(content, reply_to=to)


@dataclass
class Result:
    counts: Counter = field(default_factory=Counter)
    eval_counts: Counter = field(default_factory=Counter)
    full_rounds: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def tried(self) -> int:
        return sum(self.counts.values())

    def note(self, outcome: str, detail: str) -> None:
        self.counts[outcome] += 1
        if outcome != "accepted" and len(self.examples.setdefault(outcome, [])) < 5:
            self.examples[outcome].append(detail[:300])


def try_upload(strategy, nid: int, content: RecordDict | Error, seed: int) -> tuple[str, str]:
    """Feed one upload to ``strategy`` as a round's only reply; returns (outcome, detail)."""
    from fedbip_flower.federation.strategy import ClientRecord

    msg = instruction(nid)
    strategy.clients = {nid: ClientRecord(nid)}
    strategy.accepted, strategy.synthetic, strategy._sent = {}, {}, [msg]
    catch = _Catch()
    logging.getLogger("fedbip_flower").addHandler(catch)
    try:
        try:
            strategy._collect([_reply(content, msg)])
        except Exception as err:  # noqa: BLE001 - what the fuzzer looks for
            return "crashed", f"intake: {type(err).__name__}: {err}"
        rec = strategy.clients.get(nid)
        if rec is None:
            return "crashed", "the node's record vanished"
        if rec.status == "rejected":
            named = any(f"node {nid}" in line for line in catch.lines)
            if not named:
                return "crashed", f"rejection without a log line naming node {nid}: {rec.reason}"
            return ("guarded" if rec.reason.startswith("unreadable upload") else "rejected"), rec.reason
        if rec.status != "accepted":
            return "crashed", f"status {rec.status!r}"
        try:
            ok = strategy.synthesize(nid, seed)
        except Exception as err:  # noqa: BLE001
            return "crashed", f"synthesis: {type(err).__name__}: {err}"
        if not ok:
            return "synth-failed", strategy.clients[nid].reason
        x, y = strategy.synthetic[nid].load()
        if x.dtype != torch.uint8 or len(x) != len(y) or len(y) == 0:
            return "synth-failed", f"synthesis returned {tuple(x.shape)} images for {len(y)} labels"
        return "accepted", ""
    finally:
        logging.getLogger("fedbip_flower").removeHandler(catch)


def try_evaluation(strategy, nid: int, content: RecordDict | Error) -> tuple[str, str]:
    """Feed one evaluation reply to ``aggregate_evaluate``; returns (outcome, detail)."""
    from fedbip_flower.federation.strategy import ClientRecord

    msg = instruction(nid, "evaluate")
    strategy.clients = {nid: ClientRecord(nid, status="accepted")}
    strategy._sent = [msg]
    try:
        strategy.aggregate_evaluate(1, [_reply(content, msg)])
    except Exception as err:  # noqa: BLE001
        return "crashed", f"evaluation: {type(err).__name__}: {err}"
    rec = strategy.clients[nid]
    if rec.accuracy is not None and not (0.0 <= rec.accuracy <= 1.0 and rec.num_test > 0):
        return "crashed", f"recorded an impossible score {rec.accuracy} on {rec.num_test}"
    return ("accepted" if rec.accuracy is not None else "rejected"), rec.evaluation


def try_full_round(strategy, model: Model, content: RecordDict | Error, seed: int) -> tuple[str, str]:
    """``aggregate_train`` with the fuzzed reply beside two honest ones (min-clients 2)."""
    from fedbip_flower.federation.strategy import ClientRecord

    msgs = {nid: instruction(nid) for nid in (1, 2, 3)}
    strategy.clients = {nid: ClientRecord(nid) for nid in msgs}
    strategy.accepted, strategy.synthetic, strategy._sent = {}, {}, list(msgs.values())
    replies = [
        _reply(to_record_dict(honest_payload(model, seed + k, domain=d)), msgs[nid])
        for k, (nid, d) in enumerate([(1, "medical"), (2, "thermal")])
    ]
    replies.append(_reply(content, msgs[3]))
    try:
        arrays, _ = strategy.aggregate_train(1, replies)
    except Exception as err:  # noqa: BLE001
        return "crashed", f"aggregate_train: {type(err).__name__}: {err}"
    if strategy.clients[1].status != "accepted" or strategy.clients[2].status != "accepted" or not len(arrays):
        return "crashed", "the honest clients did not make it through the round"
    return "accepted", ""


def make_strategy(model_id: str = "bundled", device: str = "cpu", overrides: dict | None = None):
    from fedbip_flower.config import FedBiPConfig
    from fedbip_flower.federation.strategy import FedBiPStrategy
    from fedbip_flower.models.ldm import load_components

    run_config = {
        "model.id": model_id,
        "model.device": device,
        "min-clients": 2,
        "server.inference-steps": 2,
        "server.multiplier": 1,
        "server.batch-size": 16,
        "classifier.epochs": 1,
        "classifier.batch-size": 16,
        "server.max-upload-mb": 64.0,
        **(overrides or {}),
    }
    cfg = FedBiPConfig.from_run_config(run_config)
    comps = load_components(cfg.model.id, device, "float32")
    return FedBiPStrategy(cfg, comps, progress=False), Model.of(comps, cfg.data.resolution)


def fuzz(
    replies: int, seed: int = 0, model_id: str = "bundled", full_every: int = 100, progress: bool = False
) -> Result:
    """Fuzz ``replies`` uploads (and as many evaluation replies); returns the counts."""
    strategy, model = make_strategy(model_id)
    src = Source(seed)
    res = Result()
    t0 = time.time()
    ours, flwr_log = logging.getLogger("fedbip_flower"), logging.getLogger("flwr")
    saved = ours.propagate, ours.level, flwr_log.level
    ours.propagate = False  # thousands of rejections: counted (and checked), not printed
    sink = logging.NullHandler()
    ours.addHandler(sink)
    ours.setLevel(logging.INFO)
    flwr_log.setLevel(logging.ERROR)  # "record ... replaced" warnings of the mutations
    warnings.simplefilter("ignore", RuntimeWarning)  # overflowing casts of the mutations
    try:
        for i in range(replies):
            nid = 1000 + i
            content = fuzzed_content(src, model, seed * 100003 + i)
            outcome, detail = try_upload(strategy, nid, content, seed + i)
            res.note(outcome, f"reply {i}: {detail}")
            ev, ev_detail = try_evaluation(strategy, nid, fuzzed_evaluation(src))
            res.eval_counts[ev] += 1
            if ev == "crashed":
                res.note("crashed", f"evaluation reply {i}: {ev_detail}")
            if full_every and i % full_every == full_every - 1:
                out, detail = try_full_round(strategy, model, fuzzed_content(src, model, seed + i), seed + i)
                res.full_rounds += 1
                if out == "crashed":
                    res.note("crashed", f"full round {i}: {detail}")
            if progress and (i + 1) % 100 == 0:
                print(f"  {i + 1} replies, {dict(res.counts)}", file=sys.stderr, flush=True)
    finally:
        ours.removeHandler(sink)
        ours.propagate, flwr_log.level = saved[0], saved[2]
        ours.setLevel(saved[1])
    res.seconds = time.time() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedbip_flower.tools.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--replies", type=int, default=2000, help="fuzzed uploads to try (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="bundled", help="model.id of the server (default: the bundled LDM)")
    p.add_argument(
        "--full-every",
        type=int,
        default=100,
        help="every N replies, a whole aggregate_train with two honest replies (0: never)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()) if a.quiet else contextlib.nullcontext():
        res = fuzz(a.replies, a.seed, a.model, a.full_every, progress=not a.quiet)
    c = res.counts
    print(
        f"fuzzed replies: {res.tried} tried, {c['accepted']} accepted, {c['rejected']} rejected, "
        f"{c['guarded']} caught by the per-client guard, {c['synth-failed']} accepted but not synthesizable, "
        f"{c['crashed']} crashed; evaluation replies: {dict(res.eval_counts)}; "
        f"{res.full_rounds} full rounds; {sum(SKIPPED.values())} mutations skipped; {res.seconds:.0f} s"
    )
    for outcome in ("crashed", "synth-failed", "guarded"):
        for ex in res.examples.get(outcome, []):
            print(f"  {outcome}: {ex}")
    return 1 if c["crashed"] or c["synth-failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
