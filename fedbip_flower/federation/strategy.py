"""FedBiPStrategy: a one-shot Flower strategy (one upload round, one evaluation round).

Train phase: wait for ``min-clients`` nodes, send every connected node the personalization
instruction, validate each reply (a bad or failed reply is rejected with a logged reason
naming the node), then run the server pipeline shared with the benchmark
(:func:`~fedbip_flower.federation.server_pipeline.build_global_model`): synthesize a training set from
the good uploads, in an order and with seeds fixed by the uploads themselves, and train the
global classifier. Evaluate phase: send the classifier to every instructed node still
online, which scores it on its private test split.

A valid upload is still not trusted: before synthesis the pipeline bounds each site's share
(quota of ``data.shots`` latents per class, balanced site shares) and screens its concepts and
latents (:mod:`~fedbip_flower.federation.trust`); a flagged site or class is excluded by
default (``server.defence``), with its findings logged naming the node and written to
``results.json``.

No client can stop the run: every per-client step (intake, validation including the prompt
layout with the server's tokenizer, synthesis from that client's upload, its evaluation
reply) is guarded on its own, and a failure rejects or ignores that client only, with a
logged reason naming its node id. Client strings are bounded and made printable before they
reach a log line or a stored reason. The run stops only when fewer than ``min-clients``
uploads are left (accepted and synthesized).

Rejected sites receive the classifier in the evaluation round like accepted ones; their
scores are reported apart (``scores()["rejected"]``) and never enter the headline mean,
which covers accepted sites only.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedbip_flower.config import FedBiPConfig
from fedbip_flower.federation.payload import (
    META,
    UPLOAD,
    Expected,
    PayloadError,
    safe_text,
    validate_reply,
)
from fedbip_flower.federation.server_pipeline import build_global_model, synthesize_upload
from fedbip_flower.federation.synthetic_set import Shard, SyntheticStore
from fedbip_flower.method.upload import ClientPayload
from fedbip_flower.models.classifier import state_to_cpu
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


@dataclass
class RunOutcome:
    """What a FedBiP run produced, as the ServerApp reports and saves it (one typed value:
    the ServerApp reads nothing else of the strategy)."""

    clients: list[ClientRecord]  # every instructed node, sorted by (domain, node id)
    names: dict[int, str]  # node id -> registered name (where the SuperLink knows one)
    scores: dict  # see FedBiPStrategy.scores
    classifier: torch.nn.Module | None
    class_names: list[str]
    synthetic: dict[int, Shard]  # node id -> its synthetic images (kept sites)
    synthetic_dir: Path | None
    timings: dict[str, float]
    model_source: str
    model_fingerprint: str

    @property
    def num_synthetic(self) -> int:
        return int(sum(len(v) for v in self.synthetic.values()))

    def client(self, nid: int) -> ClientRecord:
        return next(r for r in self.clients if r.node_id == nid)


def expected_for(components: LDMComponents, cfg: FedBiPConfig) -> Expected:
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


class FedBiPStrategy(Strategy):
    """One-shot FedBiP: collect, validate, synthesize, train; then evaluate on clients."""

    def __init__(
        self,
        cfg: FedBiPConfig,
        components: LDMComponents,
        progress: bool = True,
        workers: list[LDMComponents] | None = None,
        synthetic_dir: Path | None = None,
    ):
        """``workers``: the LDM on each server device (default: ``components``); sites'
        synthesis is spread over them. ``synthetic_dir``: where the synthetic set is written
        site by site (default: kept in memory)."""
        self.cfg = cfg
        self.components = components
        self.workers = workers or [components]
        self.synthetic_dir = synthetic_dir
        self.progress = progress
        self.expected = expected_for(components, cfg)
        self.clients: dict[int, ClientRecord] = {}
        self.accepted: dict[int, ClientPayload] = {}
        self.synthetic: dict[int, Shard] = {}
        self.classifier: torch.nn.Module | None = None
        self.class_names: list[str] = []
        self.timings: dict[str, float] = {}
        self._t_sent = self._t_synthesis = 0.0
        self._sent: list[Message] = []
        self.names: dict[int, str] = {}  # node id -> the name it was registered with (if any)
        self.stopped_early = ""  # why the upload round stopped before every reply was in

    def start(self, grid: Grid, *args, **kwargs):
        """Flower's ``Strategy.start`` over :class:`RoundGrid`: replies are logged as they
        arrive, and the upload round stops as soon as ``min-clients`` good uploads can no
        longer be reached."""
        return super().start(RoundGrid(grid, self), *args, **kwargs)

    def who(self, nid: int) -> str:
        """A node as log lines name it: its id, and its registered name or domain when known."""
        rec = self.clients.get(nid)
        extra = [x for x in (self.names.get(nid, ""), rec.domain if rec else "") if x]
        return f"node {nid}" + (f" ({', '.join(dict.fromkeys(extra))})" if extra else "")

    def _sender(self, rep: Message) -> int:
        """The node a reply is about. Flower's own error replies (e.g. NODE_UNAVAILABLE for a
        lost node) come from the SuperLink, so map the instruction's id back to its node."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        return sent.get(rep.metadata.reply_to_message_id, rep.metadata.src_node_id)

    # ------------------------------------------------------------------ helpers
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        need, deadline = self.cfg.min_clients, time.time() + self.cfg.server.wait_timeout
        nodes = list(grid.get_node_ids())
        if len(nodes) < need:
            log.info(
                "waiting for %d node(s) (%d online; at most %.0f s)", need, len(nodes), self.cfg.server.wait_timeout
            )
        while len(nodes) < need and time.time() < deadline:
            time.sleep(1.0)
            nodes = list(grid.get_node_ids())
        if len(nodes) < need:
            raise FedBiPError(
                f"only {len(nodes)} node(s) connected after {self.cfg.server.wait_timeout:.0f} s; min-clients is {need}"
            )
        self.names = node_names(grid)
        return sorted(nodes)

    def _reject(self, node_id: int, reason: str) -> None:
        """Mark ``node_id``'s upload rejected; ``reason`` (which may quote client text) is kept
        and logged as one bounded, printable line naming the node."""
        rec = self.clients.setdefault(node_id, ClientRecord(node_id))
        rec.status, rec.reason = "rejected", safe_text(reason, MAX_REASON_BYTES)
        self.accepted.pop(node_id, None)
        self.synthetic.pop(node_id, None)
        log.warning("rejected the upload of %s: %s", self.who(node_id), rec.reason)

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self._wait_for_nodes(grid)
        log.info(
            "phase 1/4 uploads: sending the personalization instruction to %d node(s): %s",
            len(nodes),
            ", ".join(self.who(n) for n in nodes),
        )
        self._t_sent = time.time()
        msgs = []
        for nid in nodes:
            self.clients[nid] = ClientRecord(nid)
            content = RecordDict({"config": ConfigRecord(dict(config))})
            msgs.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid))
        self._sent = msgs  # the Grid sets their message ids in place when it pushes them
        return msgs

    def _collect(self, replies: Iterable[Message]) -> None:
        """Intake of the upload round: each reply is validated on its own; whatever it holds,
        a bad one only rejects its node (with a logged reason naming it)."""
        seen: set[int] = set()
        for nid, rep in self._distinct(replies, "upload", "instruction"):
            seen.add(nid)
            try:
                self.intake(nid, rep)
            except Exception as err:  # noqa: BLE001 - a hostile reply must not stop the run
                self._reject(nid, f"unreadable upload: {type(err).__name__}: {err}")
        for nid in self.clients:
            if nid not in seen:
                self._reject(nid, self.stopped_early or "no reply before the round timeout (node lost or too slow)")
        self._agree_on_classes()

    def _distinct(self, replies: Iterable[Message], what: str, sent: str) -> Iterator[tuple[int, Message]]:
        """(node id, reply) for the first reply of each node that was sent the ``sent``; a reply
        without a readable sender, from a node sent nothing, or repeated is logged and skipped."""
        seen: set[int] = set()
        for rep in replies:
            try:
                nid = self._sender(rep)
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
        """Validate node ``nid``'s upload and record it as accepted, or reject it (returns None).

        Validation covers everything synthesis relies on later, including laying out the
        prompts with the server's tokenizer; an accepted payload is one synthesis can use.
        """
        rec = self.clients.setdefault(nid, ClientRecord(nid))
        if rep.has_error():
            self._reject(nid, f"client failed (code {rep.error.code}): {rep.error.reason}")
            return None
        try:
            payload = validate_reply(rep.content, self.expected)
        except PayloadError as err:
            self._reject(nid, f"invalid upload: {err}")
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

    def _agree_on_classes(self) -> None:
        """Every accepted client must agree on the class list: the majority's is kept."""
        if not self.accepted:
            return
        names, _ = Counter(tuple(p.class_names) for p in self.accepted.values()).most_common(1)[0]
        self.class_names = list(names)
        for nid, p in list(self.accepted.items()):
            if tuple(p.class_names) != names:
                self._reject(
                    nid,
                    f"its {len(p.class_names)} class names {p.class_names[:3]}... differ from "
                    f"the majority's {len(names)} {list(names[:3])}...",
                )

    def _require_min_clients(self, stage: str) -> None:
        good = len(self.accepted)
        if good < self.cfg.min_clients:
            reasons = "; ".join(f"node {r.node_id}: {r.reason}" for r in self.clients.values() if r.reason)
            raise FedBiPError(f"only {good} good upload(s){stage}, min-clients is {self.cfg.min_clients}. {reasons}")

    def synthesize(self, nid: int, seed: int) -> bool:
        """Synthesize node ``nid``'s whole accepted upload on its own (into memory); a failure
        rejects that node only (returns False). The run itself synthesizes through
        :func:`~fedbip_flower.federation.server_pipeline.build_global_model`."""
        try:
            x, y = synthesize_upload(self.components, self.accepted[nid], self.cfg, seed, self.progress)
            self.synthetic[nid] = SyntheticStore().put(nid, 0, self.accepted[nid].domain, x, y)
        except Exception as err:  # noqa: BLE001 - one client's upload must not stop the run
            self._reject(nid, f"synthesis from its upload failed: {type(err).__name__}: {err}")
            return False
        return True

    def _before_training(self, synthetic: dict[int, Shard]) -> None:
        self.timings["synthesis"] = time.time() - self._t_synthesis
        self.synthetic = synthetic
        self._require_min_clients(" left after synthesis")
        log.info(
            "phase 3/4 classifier: training %s on %d synthetic images",
            self.cfg.classifier.arch,
            sum(len(v) for v in synthetic.values()),
        )

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Intake, then the server pipeline (:func:`~fedbip_flower.federation.server_pipeline.build_global_model`).

        Client order and synthesis seeds follow from the accepted uploads alone, never from
        node ids or the order of the replies: the benchmark's FedBiP rows run the same
        pipeline on the same uploads.
        """
        self.timings["clients"] = time.time() - self._t_sent
        self._collect(replies)
        log.info("%d of %d upload(s) accepted", len(self.accepted), len(self.clients))
        self._require_min_clients("")
        log.info("phase 2/4 synthesis: screening and synthesizing from %d upload(s)", len(self.accepted))
        self._t_synthesis = time.time()
        built = build_global_model(
            self.components,
            dict(self.accepted),
            self.cfg,
            progress=self.progress,
            reject=self._reject,
            before_training=self._before_training,
            describe=self.who,
            workers=self.workers,
            store=SyntheticStore(self.synthetic_dir),
        )
        for nid, screen in built.screening.items():
            if nid in self.clients:
                self.clients[nid].screening = screen.to_dict()
        self.timings["classifier"] = built.timings["classifier"]
        self.classifier = built.classifier
        metrics = MetricRecord({"num-synthetic": len(built.labels), "num-accepted": len(built.order), **built.stats})
        return ArrayRecord(state_to_cpu(self.classifier)), metrics

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the classifier to every instructed node that is still online.

        Rejected sites receive it too: they are authenticated members of the federation (a
        rejection is about one upload, not membership) and would have received it with a
        good upload. Their scores are kept apart: the headline mean covers accepted sites
        only (see ``scores``).
        """
        self._t_sent = time.time()
        online = set(grid.get_node_ids())
        msgs = []
        for nid in sorted(self.clients):
            rec = self.clients[nid]
            if nid not in online:
                rec.evaluation = "offline when the classifier was sent"
                continue
            rec.evaluation = "no evaluation reply"
            content = RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))})
            msgs.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=nid))
        self._sent = msgs
        log.info("phase 4/4 evaluation: sending the classifier to %d node(s)", len(msgs))
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each node's score; a malformed or failed reply is logged (naming the node)
        and ignored. Returns the mean over accepted sites, or None if none of them scored."""
        for nid, rep in self._distinct(replies, "evaluation", "classifier"):
            try:
                self.record_evaluation(nid, rep)
            except Exception as err:  # noqa: BLE001 - never let one reply stop the run
                self._eval_problem(nid, f"unreadable evaluation reply: {type(err).__name__}: {err}")
        self.timings["evaluation"] = time.time() - self._t_sent
        for nid in sorted(self.clients):
            rec = self.clients[nid]
            score = "-" if rec.accuracy is None else f"{rec.accuracy:.4f} on {rec.num_test} test image(s)"
            log.info("score of %s [%s]: %s (%s)", self.who(nid), rec.status, score, rec.evaluation)
        scores = self.scores()
        if not scores["accepted"]:
            return None
        return MetricRecord(
            {
                "accuracy-mean": scores["mean"],
                "accuracy-weighted": scores["weighted"],
                "num-clients": len(scores["accepted"]),
            }
        )

    def _eval_problem(self, nid: int, what: str) -> None:
        rec = self.clients[nid]
        rec.accuracy, rec.num_test = None, 0
        rec.evaluation = safe_text(what, MAX_REASON_BYTES)
        log.warning("%s: %s", self.who(nid), rec.evaluation)

    def record_evaluation(self, nid: int, rep: Message) -> None:
        """Check and record node ``nid``'s evaluation reply (never raises for bad content)."""
        rec = self.clients[nid]
        if rep.has_error():
            self._eval_problem(nid, f"failed to evaluate (code {rep.error.code}): {rep.error.reason}")
            return
        if "metrics" not in rep.content.metric_records:
            self._eval_problem(nid, "sent no 'metrics' record with its evaluation")
            return
        m = rep.content.metric_records["metrics"]
        acc, n = m.get("accuracy"), m.get("num-examples")
        if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc):
            self._eval_problem(nid, f"sent a malformed accuracy ({safe_text(repr(acc), 80)})")
            return
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TEST_IMAGES:
            self._eval_problem(nid, f"sent a malformed test count ({safe_text(repr(n), 80)})")
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
            self._eval_problem(nid, f"sent an accuracy outside [0, 1] ({acc!r})")
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

    def outcome(self) -> RunOutcome:
        """The run so far as one value (complete once ``start`` has returned)."""
        return RunOutcome(
            clients=sorted(self.clients.values(), key=lambda r: (r.domain, r.node_id)),
            names=dict(self.names),
            scores=self.scores(),
            classifier=self.classifier,
            class_names=list(self.class_names),
            synthetic=dict(self.synthetic),
            synthetic_dir=self.synthetic_dir,
            timings=dict(self.timings),
            model_source=str(self.components.source),
            model_fingerprint=str(self.components.fingerprint),
        )

    def summary(self) -> None:
        c = self.cfg
        log.info(
            "FedBiPStrategy: one-shot, min-clients=%d, synthesis x%d, %d DDIM steps, "
            "guidance %.1f, classifier %s %d epochs",
            c.min_clients,
            c.server.multiplier,
            c.server.inference_steps,
            c.server.guidance_scale,
            c.classifier.arch,
            c.classifier.epochs,
        )


def node_names(grid: Grid) -> dict[int, str]:
    """The names the nodes were registered with (``flwr supernode register --name``), as
    bounded printable text; {} where the Grid knows none (simulation)."""
    try:
        return {int(n.node_id): safe_text(n.name, 40) for n in grid.get_nodes() if getattr(n, "name", "")}
    except Exception as err:  # noqa: BLE001 - names only decorate log lines
        log.debug("no node names: %s", err)
        return {}


class RoundGrid(Grid):
    """The run's Grid, with a ``send_and_receive`` that reports replies as they arrive and
    stops the upload round early.

    Flower's own loop waits for every reply or the round timeout. Here each reply is logged
    when it arrives (``upload n/N from node ...``); in the upload round, once the replies that
    failed leave fewer possible uploads than ``min-clients``, the round stops at once: the
    run cannot complete, so the server fails with the reason instead of waiting for the
    other sites to finish their work. Everything else is the wrapped Grid's.
    """

    def __init__(self, grid: Grid, strategy: FedBiPStrategy):
        self.grid, self.strategy = grid, strategy

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        kind = msgs[0].metadata.message_type if msgs else ""
        pending = set(self.grid.push_messages(msgs))
        total, need = len(pending), self.strategy.cfg.min_clients
        end = time.time() + (timeout if timeout is not None else math.inf)
        interval = float(getattr(self.grid, "pull_interval", 3.0))
        replies: list[Message] = []
        failed = 0
        while pending and time.time() < end:
            got = list(self.grid.pull_messages(pending))
            for rep in got:
                pending.discard(rep.metadata.reply_to_message_id)
                replies.append(rep)
                failed += int(rep.has_error())
                self._report(kind, rep, len(replies), total)
            if pending and kind == MessageType.TRAIN and total - failed < need:
                self.strategy.stopped_early = (
                    f"no reply yet when the round stopped: {failed} of {total} site(s) failed, so at most "
                    f"{total - failed} upload(s) can arrive and min-clients is {need}"
                )
                log.error("upload round stopped early: %s", self.strategy.stopped_early.split(": ", 1)[1])
                break
            if pending:
                time.sleep(interval)
        return replies

    def _report(self, kind: str, rep: Message, n: int, total: int) -> None:
        try:
            who = self.strategy.who(self.strategy._sender(rep))
        except Exception:  # noqa: BLE001 - the intake reports unreadable replies
            who = "an unknown node"
        what = "upload" if kind == MessageType.TRAIN else "evaluation"
        if rep.has_error():
            log.warning("%s %d/%d: %s failed: %s", what, n, total, who, safe_text(rep.error.reason, 300))
        else:
            log.info("%s %d/%d: received from %s", what, n, total, who)
