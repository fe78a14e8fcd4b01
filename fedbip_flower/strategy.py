"""FedBiPStrategy: a one-shot Flower strategy (one upload round, one evaluation round).

Train phase: wait for ``min-clients`` nodes, send every connected node the personalization
instruction, validate each reply (a bad or failed reply is rejected with a logged reason
naming the node), synthesize a training set from the good uploads and train the global
classifier. Evaluate phase: send the classifier to every node, which scores it on its
private test split.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedbip_flower.classifier import state_to_cpu, train_classifier
from fedbip_flower.config import FedBiPConfig
from fedbip_flower.ldm import LDMComponents
from fedbip_flower.payload import META, UPLOAD, ClientPayload, Expected, PayloadError, validate_reply
from fedbip_flower.synthesize import synthesize_client

log = logging.getLogger(__name__)


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


def expected_for(components: LDMComponents, cfg: FedBiPConfig) -> Expected:
    return Expected(
        model_fingerprint=components.fingerprint,
        latent_channels=components.latent_channels,
        latent_size=cfg.data.resolution // components.vae_factor,
        hidden_size=components.hidden_size,
        max_bytes=int(cfg.server.max_upload_mb * 2**20),
        max_images=cfg.server.max_images,
        allow_empty_latents=not cfg.client.upload_latents,
    )


class FedBiPStrategy(Strategy):
    """One-shot FedBiP: collect, validate, synthesize, train; then evaluate on clients."""

    def __init__(self, cfg: FedBiPConfig, components: LDMComponents, progress: bool = True):
        self.cfg = cfg
        self.components = components
        self.progress = progress
        self.expected = expected_for(components, cfg)
        self.clients: dict[int, ClientRecord] = {}
        self.accepted: dict[int, ClientPayload] = {}
        self.synthetic: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.classifier: torch.nn.Module | None = None
        self.class_names: list[str] = []
        self.timings: dict[str, float] = {}
        self._t_sent = 0.0
        self._sent: list[Message] = []

    def _sender(self, rep: Message) -> int:
        """The node a reply is about. Flower's own error replies (e.g. NODE_UNAVAILABLE for a
        lost node) come from the SuperLink, so map the instruction's id back to its node."""
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        return sent.get(rep.metadata.reply_to_message_id, rep.metadata.src_node_id)

    # ------------------------------------------------------------------ helpers
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        need, deadline = self.cfg.min_clients, time.time() + self.cfg.server.wait_timeout
        nodes = list(grid.get_node_ids())
        while len(nodes) < need and time.time() < deadline:
            time.sleep(1.0)
            nodes = list(grid.get_node_ids())
        if len(nodes) < need:
            raise FedBiPError(
                f"only {len(nodes)} node(s) connected after {self.cfg.server.wait_timeout:.0f} s; "
                f"min-clients is {need}"
            )
        return sorted(nodes)

    def _reject(self, node_id: int, reason: str) -> None:
        rec = self.clients.setdefault(node_id, ClientRecord(node_id))
        rec.status, rec.reason = "rejected", reason
        self.accepted.pop(node_id, None)
        log.warning("rejected the upload of node %s: %s", node_id, reason)

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:  # fmt: skip
        nodes = self._wait_for_nodes(grid)
        log.info("sending the personalization instruction to %d node(s)", len(nodes))
        self._t_sent = time.time()
        msgs = []
        for nid in nodes:
            self.clients[nid] = ClientRecord(nid)
            content = RecordDict({"config": ConfigRecord(dict(config))})
            msgs.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid))
        self._sent = msgs  # the Grid sets their message ids in place when it pushes them
        return msgs

    def _collect(self, replies: Iterable[Message]) -> None:
        seen = set()
        for rep in replies:
            nid = self._sender(rep)
            seen.add(nid)
            rec = self.clients.setdefault(nid, ClientRecord(nid))
            if rep.has_error():
                self._reject(nid, f"client failed (code {rep.error.code}): {rep.error.reason}")
                continue
            try:
                payload = validate_reply(rep.content, self.expected)
            except PayloadError as err:
                self._reject(nid, f"invalid upload: {err}")
                continue
            except Exception as err:  # a hostile payload must not crash the server
                self._reject(nid, f"unreadable upload: {type(err).__name__}: {err}")
                continue
            rec.status, rec.domain = "accepted", payload.domain
            rec.upload_bytes = rep.content.array_records[UPLOAD].count_bytes()
            rec.num_images = int(payload.labels.numel())
            metrics = rep.content.metric_records.get("metrics")
            rec.client_metrics = {k: float(v) for k, v in (metrics or {}).items()}
            self.accepted[nid] = payload
        for nid, rec in self.clients.items():
            if nid not in seen:
                self._reject(nid, "no reply before the round timeout (node lost or too slow)")
        if self.accepted:  # every accepted client must agree on the class list
            names, _ = Counter(tuple(p.class_names) for p in self.accepted.values()).most_common(1)[0]
            self.class_names = list(names)
            for nid, p in list(self.accepted.items()):
                if tuple(p.class_names) != names:
                    self._reject(nid, f"class names {p.class_names[:5]}... differ from the majority's")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        self.timings["clients"] = time.time() - self._t_sent
        self._collect(replies)
        good = len(self.accepted)
        log.info("%d of %d upload(s) accepted", good, len(self.clients))
        if good < self.cfg.min_clients:
            reasons = "; ".join(f"node {r.node_id}: {r.reason}" for r in self.clients.values() if r.reason)
            raise FedBiPError(
                f"only {good} good upload(s), min-clients is {self.cfg.min_clients}. {reasons}"
            )
        t0 = time.time()
        order = sorted(self.accepted, key=lambda n: (self.accepted[n].domain, self._digest(n)))
        for k, nid in enumerate(order):
            p = self.accepted[nid]
            self.synthetic[nid] = synthesize_client(
                self.components, p, self.cfg.server, seed=self.cfg.seed * 1000 + k,
                progress=self.progress, desc=f"synthesis {p.domain}",
            )  # fmt: skip
        self.timings["synthesis"] = time.time() - t0
        x = torch.cat([self.synthetic[n][0] for n in order])
        y = torch.cat([self.synthetic[n][1] for n in order])
        log.info("synthesized %d images in %.1f s", len(x), self.timings["synthesis"])
        t0 = time.time()
        self.classifier, stats = train_classifier(
            x, y, len(self.class_names), self.cfg.classifier, self.cfg.seed,
            self.components.device, self.progress,
        )  # fmt: skip
        self.timings["classifier"] = time.time() - t0
        metrics = MetricRecord({"num-synthetic": len(x), "num-accepted": good, **stats})
        return ArrayRecord(state_to_cpu(self.classifier)), metrics

    def _digest(self, nid: int) -> int:
        p = self.accepted[nid]
        return hash((p.labels.numel(), tuple(p.labels[:32].tolist()), round(float(p.s.sum()), 4)))

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:  # fmt: skip
        self._t_sent = time.time()
        online = set(grid.get_node_ids())
        msgs = []
        for nid in sorted(n for n in self.clients if n in online):
            content = RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))})
            msgs.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=nid))
        self._sent = msgs
        log.info("sending the classifier to %d node(s) for evaluation", len(msgs))
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        for rep in replies:
            nid = self._sender(rep)
            rec = self.clients.setdefault(nid, ClientRecord(nid))
            if rep.has_error():
                log.warning("node %s failed to evaluate: %s", nid, rep.error.reason)
                continue
            try:
                m = rep.content.metric_records["metrics"]
                acc, n = float(m["accuracy"]), int(m["num-examples"])
                meta = rep.content.config_records.get(META)
                if meta is not None and isinstance(meta.get("domain"), str) and not rec.domain:
                    rec.domain = meta["domain"][:200]
            except (KeyError, TypeError, ValueError) as err:
                log.warning("node %s sent malformed metrics: %s", nid, err)
                continue
            if n == 0:  # a site whose partition left no test images cannot score
                log.info("node %s has no test images: not scored", nid)
                rec.num_test = 0
                continue
            if not (0.0 <= acc <= 1.0) or n < 0:
                log.warning("node %s sent out-of-range metrics (%s, %s)", nid, acc, n)
                continue
            rec.accuracy, rec.num_test = acc, n
        self.timings["evaluation"] = time.time() - self._t_sent
        scored = [r for r in self.clients.values() if r.accuracy is not None]
        if not scored:
            return None
        mean = sum(r.accuracy for r in scored) / len(scored)
        total = sum(r.num_test for r in scored)
        weighted = sum(r.accuracy * r.num_test for r in scored) / max(1, total)
        return MetricRecord({"accuracy-mean": mean, "accuracy-weighted": weighted, "num-clients": len(scored)})

    def summary(self) -> None:
        c = self.cfg
        log.info("FedBiPStrategy: one-shot, min-clients=%d, synthesis x%d, %d DDIM steps, "
                 "guidance %.1f, classifier %s %d epochs", c.min_clients, c.server.multiplier,
                 c.server.inference_steps, c.server.guidance_scale, c.classifier.arch,
                 c.classifier.epochs)  # fmt: skip
