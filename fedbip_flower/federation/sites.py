"""The server's record of the sites of one run: what each was sent, what it sent back, and why
a reply was rejected or ignored.

:class:`Sites` is the intake the strategy delegates to. Every reply is handled on its own: a
reply without a readable sender, from a node that was sent nothing, or repeated is logged and
skipped; an upload is checked by the payload validation
(:func:`~fedbip_flower.federation.payload.validate_reply`, which also lays out the prompts with
the server's tokenizer, so an accepted upload is one synthesis can use); the accepted uploads
must agree on one class list (the majority's is kept); an evaluation reply is checked before
its score is recorded. Whatever a reply holds, a bad one only rejects or ignores its node, with
one bounded, printable reason naming the node in the log and in ``results.json``.

Rejected sites are scored apart: the headline mean covers accepted sites only.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from flwr.app import Message

from fedbip_flower.config import FedBiPConfig
from fedbip_flower.federation.payload import META, UPLOAD, Expected, PayloadError, safe_text, validate_reply
from fedbip_flower.method.upload import ClientPayload
from fedbip_flower.models.ldm import LDMComponents

log = logging.getLogger(__name__)
MAX_REASON_BYTES = 600  # a rejection reason or evaluation note, as logged and stored
MAX_TEST_IMAGES = 10**9


class FedBiPError(RuntimeError):
    """The run cannot continue (too few clients or good uploads)."""


@dataclass
class ClientRecord:
    node_id: int
    status: str = "sent"  # sent / accepted / rejected
    reason: str = ""
    domain: str = ""
    upload_bytes: int = 0
    num_images: int = 0
    client_metrics: dict[str, float] = field(default_factory=dict)
    accuracy: float | None = None
    num_test: int = 0
    evaluation: str = "not sent"  # scored / why the node has no score
    screening: dict = field(default_factory=dict)  # quota, findings and action (trust.Screening)


def expected_for(components: LDMComponents, cfg: FedBiPConfig) -> Expected:
    """What a valid upload for this server's model and run config looks like."""
    return Expected(
        model_fingerprint=components.fingerprint,
        latent_channels=components.latent_channels,
        latent_size=cfg.data.resolution // components.vae_factor,
        hidden_size=components.hidden_size,
        max_bytes=int(cfg.server.max_upload_mb * 2**20),
        max_images=cfg.server.max_images,
        allow_empty_latents=not cfg.client.upload_latents,
        tokenizer=components.tokenizer,
    )


class Sites:
    """Every instructed node's record, the accepted uploads and the agreed class list."""

    def __init__(self, expected: Expected, min_clients: int):
        self.expected, self.min_clients = expected, min_clients
        self.clients: dict[int, ClientRecord] = {}
        self.accepted: dict[int, ClientPayload] = {}
        self.class_names: list[str] = []
        self.names: dict[int, str] = {}  # node id -> the name it was registered with (if any)
        self.stopped_early = ""  # why the upload round stopped before every reply was in
        self._sent: list[Message] = []

    def instruct(self, msgs: list[Message], kind: str) -> None:
        """Remember the messages of a round (the Grid sets their ids in place when it pushes
        them); a train round starts every addressed node's record afresh."""
        self._sent = msgs
        if kind == "train":
            for m in msgs:
                self.clients[m.metadata.dst_node_id] = ClientRecord(m.metadata.dst_node_id)

    def who(self, nid: int) -> str:
        """A node as log lines name it: its id, and its registered name or domain when known."""
        rec = self.clients.get(nid)
        extra = [x for x in (self.names.get(nid, ""), rec.domain if rec else "") if x]
        return f"node {nid}" + (f" ({', '.join(dict.fromkeys(extra))})" if extra else "")

    def sender(self, rep: Message) -> int:
        """The node a reply is about. Flower's own error replies (e.g. NODE_UNAVAILABLE for a
        lost node) come from the SuperLink, so map the instruction's id back to its node."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        return sent.get(rep.metadata.reply_to_message_id, rep.metadata.src_node_id)

    def reject(self, node_id: int, reason: str) -> None:
        """Mark ``node_id``'s upload rejected; ``reason`` (which may quote client text) is kept
        and logged as one bounded, printable line naming the node."""
        rec = self.clients.setdefault(node_id, ClientRecord(node_id))
        rec.status, rec.reason = "rejected", safe_text(reason, MAX_REASON_BYTES)
        self.accepted.pop(node_id, None)
        log.warning("rejected the upload of %s: %s", self.who(node_id), rec.reason)

    def require(self, stage: str = "") -> None:
        """Raise :class:`FedBiPError` (with every reason) if fewer than ``min-clients`` uploads
        are left."""
        good = len(self.accepted)
        if good < self.min_clients:
            reasons = "; ".join(f"node {r.node_id}: {r.reason}" for r in self.clients.values() if r.reason)
            raise FedBiPError(f"only {good} good upload(s){stage}, min-clients is {self.min_clients}. {reasons}")

    def after_synthesis(self, screening: dict, rejected: dict[int, str]) -> None:
        """Record each site's screening (quota, findings, action, synthesis) and reject the
        sites the pipeline dropped; raise :class:`FedBiPError` if too few are left."""
        for nid, screen in screening.items():
            self.clients[nid].screening = screen.to_dict()
        for nid, why in rejected.items():
            self.reject(nid, why)
        self.require(" left after synthesis")

    # ------------------------------------------------------------------ uploads
    def collect(self, replies: Iterable[Message]) -> None:
        """Intake of the upload round; a node with no reply is rejected, and the accepted
        uploads are held to the majority's class list."""
        seen: set[int] = set()
        for nid, rep in self.distinct(replies, "upload", "instruction"):
            seen.add(nid)
            try:
                self.intake(nid, rep)
            except Exception as err:  # noqa: BLE001 - a hostile reply must not stop the run
                self.reject(nid, f"unreadable upload: {type(err).__name__}: {err}")
        for nid in self.clients:
            if nid not in seen:
                self.reject(nid, self.stopped_early or "no reply before the round timeout (node lost or too slow)")
        self.agree_on_classes()
        log.info("%d of %d upload(s) accepted", len(self.accepted), len(self.clients))

    def distinct(self, replies: Iterable[Message], what: str, sent: str) -> Iterator[tuple[int, Message]]:
        """(node id, reply) for the first reply of each node that was sent the ``sent``; a reply
        without a readable sender, from a node sent nothing, or repeated is logged and skipped."""
        seen: set[int] = set()
        for rep in replies:
            try:
                nid = self.sender(rep)
            except Exception as err:  # noqa: BLE001 - a reply without usable metadata
                log.warning("ignored an %s reply without a readable sender: %s", what, safe_text(repr(err)))
                continue
            if nid not in self.clients:
                log.warning("ignored an %s from node %s, which was sent no %s", what, nid, sent)
            elif nid in seen:
                log.warning("ignored a second %s from node %s", what, nid)
            else:
                seen.add(nid)
                yield nid, rep

    def intake(self, nid: int, rep: Message) -> ClientPayload | None:
        """Validate node ``nid``'s upload and record it as accepted, or reject it (returns None)."""
        rec = self.clients.setdefault(nid, ClientRecord(nid))
        if rep.has_error():
            self.reject(nid, f"client failed (code {rep.error.code}): {rep.error.reason}")
            return None
        try:
            payload = validate_reply(rep.content, self.expected)
        except PayloadError as err:
            self.reject(nid, f"invalid upload: {err}")
            return None
        rec.status, rec.reason, rec.domain = "accepted", "", payload.domain
        rec.upload_bytes = int(rep.content.array_records[UPLOAD].count_bytes())
        rec.num_images = int(payload.labels.numel())
        rec.client_metrics = dict(payload.metrics)
        self.accepted[nid] = payload
        log.info(
            "accepted the upload of %s: %d latent(s), %d class(es), %.2f MB",
            self.who(nid),
            rec.num_images,
            len(payload.class_names),
            rec.upload_bytes / 2**20,
        )
        return payload

    def agree_on_classes(self) -> None:
        """Every accepted client must agree on the class list: the majority's is kept."""
        if not self.accepted:
            return
        names, _ = Counter(tuple(p.class_names) for p in self.accepted.values()).most_common(1)[0]
        self.class_names = list(names)
        for nid, p in list(self.accepted.items()):
            if tuple(p.class_names) != names:
                self.reject(
                    nid,
                    f"its {len(p.class_names)} class names {p.class_names[:3]}... differ from "
                    f"the majority's {len(names)} {list(names[:3])}...",
                )

    # ------------------------------------------------------------------ evaluation
    def to_evaluate(self, online: set[int]) -> list[int]:
        """The instructed nodes that are still online (each record says why a node is not)."""
        nodes = []
        for nid in sorted(self.clients):
            if nid in online:
                self.clients[nid].evaluation = "no evaluation reply"
                nodes.append(nid)
            else:
                self.clients[nid].evaluation = "offline when the classifier was sent"
        return nodes

    def score(self, replies: Iterable[Message]) -> None:
        """Record each node's evaluation reply; a malformed or failed one is logged (naming the
        node) and ignored. Logs every node's score."""
        for nid, rep in self.distinct(replies, "evaluation", "classifier"):
            try:
                self.record_evaluation(nid, rep)
            except Exception as err:  # noqa: BLE001 - never let one reply stop the run
                self._no_score(nid, f"unreadable evaluation reply: {type(err).__name__}: {err}")
        for nid in sorted(self.clients):
            rec = self.clients[nid]
            score = "-" if rec.accuracy is None else f"{rec.accuracy:.4f} on {rec.num_test} test image(s)"
            log.info("score of %s [%s]: %s (%s)", self.who(nid), rec.status, score, rec.evaluation)

    def _no_score(self, nid: int, what: str) -> None:
        rec = self.clients[nid]
        rec.accuracy, rec.num_test = None, 0
        rec.evaluation = safe_text(what, MAX_REASON_BYTES)
        log.warning("%s: %s", self.who(nid), rec.evaluation)

    def record_evaluation(self, nid: int, rep: Message) -> None:
        """Check and record node ``nid``'s evaluation reply (never raises for bad content)."""
        rec = self.clients[nid]
        if rep.has_error():
            self._no_score(nid, f"failed to evaluate (code {rep.error.code}): {rep.error.reason}")
            return
        if "metrics" not in rep.content.metric_records:
            self._no_score(nid, "sent no 'metrics' record with its evaluation")
            return
        m = rep.content.metric_records["metrics"]
        acc, n = m.get("accuracy"), m.get("num-examples")
        if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc):
            self._no_score(nid, f"sent a malformed accuracy ({safe_text(repr(acc), 80)})")
            return
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TEST_IMAGES:
            self._no_score(nid, f"sent a malformed test count ({safe_text(repr(n), 80)})")
            return
        if META in rep.content.config_records and not rec.domain:
            domain = rep.content.config_records[META].get("domain")
            if isinstance(domain, str):
                rec.domain = safe_text(domain, 200)
        if n == 0:  # a site whose data left no test images cannot score
            rec.accuracy, rec.num_test = None, 0
            rec.evaluation = "no test images"
            return
        if not 0.0 <= acc <= 1.0:
            self._no_score(nid, f"sent an accuracy outside [0, 1] ({acc!r})")
            return
        rec.accuracy, rec.num_test, rec.evaluation = float(acc), n, "scored"

    def scores(self) -> dict:
        """Scores of accepted sites (the headline: mean and test-count weighted mean) and,
        apart, of rejected sites that evaluated the classifier anyway."""
        acc = [r for r in self.clients.values() if r.status == "accepted" and r.accuracy is not None]
        rej = [r for r in self.clients.values() if r.status != "accepted" and r.accuracy is not None]
        total = sum(r.num_test for r in acc)
        return {
            "accepted": acc,
            "rejected": rej,
            "mean": sum(r.accuracy for r in acc) / len(acc) if acc else None,
            "weighted": sum(r.accuracy * r.num_test for r in acc) / total if total else None,
            "rejected_mean": sum(r.accuracy for r in rej) / len(rej) if rej else None,
        }
