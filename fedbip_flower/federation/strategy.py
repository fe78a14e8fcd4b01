"""FedBiPStrategy: a one-shot Flower strategy (one upload round, one evaluation round).

Flower's part only; the work is delegated. Train round: wait for ``min-clients`` nodes, send
each connected node the personalization instruction, hand the replies to the intake
(:class:`~fedbip_flower.federation.sites.Sites`: validation, class-list vote, a reason naming
the node for every rejection), then to the server pipeline shared with the benchmark
(:mod:`~fedbip_flower.federation.server_pipeline`: screening and quotas, synthesis in an order
and with seeds fixed by the uploads alone, the classifier). Evaluate round: send the
classifier to every instructed node still online; each scores it on its private test split.
The run stops only when fewer than ``min-clients`` uploads are left; the outcome is handed
back as one value (:meth:`FedBiPStrategy.outcome`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedbip_flower.config import FedBiPConfig
from fedbip_flower.federation.rounds import RoundGrid, node_names, wait_for_nodes
from fedbip_flower.federation.server_pipeline import GlobalModel, synthesize_uploads, train_global
from fedbip_flower.federation.sites import ClientRecord, FedBiPError, Sites, expected_for
from fedbip_flower.federation.synthetic_set import Shard, SyntheticStore
from fedbip_flower.models.classifier import state_to_cpu
from fedbip_flower.models.ldm import LDMComponents

__all__ = ["ClientRecord", "FedBiPError", "FedBiPStrategy", "RunOutcome", "expected_for"]
log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What a FedBiP run produced, as the ServerApp reports and saves it."""

    clients: list[ClientRecord]  # every instructed node, sorted by (domain, node id)
    names: dict[int, str]  # node id -> registered name (where the SuperLink knows one)
    scores: dict  # see Sites.scores
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


class FedBiPStrategy(Strategy):
    """One-shot FedBiP: collect, validate, synthesize, train; then evaluate on clients."""

    def __init__(
        self, cfg: FedBiPConfig, components: LDMComponents, progress: bool = True, workers=None, synthetic_dir=None
    ):
        """``workers``: the LDM on each server device (default: ``components``); sites' synthesis
        is spread over them. ``synthetic_dir``: where the synthetic set is written site by site
        (default: memory)."""
        self.cfg, self.components, self.progress = cfg, components, progress
        self.workers, self.synthetic_dir = workers or [components], synthetic_dir
        self.sites = Sites(expected_for(components, cfg), cfg.min_clients)
        self.model: GlobalModel | None = None
        self.synthetic: dict[int, Shard] = {}  # node id -> its synthetic images (kept sites)
        self.timings: dict[str, float] = {}
        self._t_sent = 0.0

    def start(self, grid: Grid, *args, **kwargs):
        """Flower's ``Strategy.start`` over a :class:`~fedbip_flower.federation.rounds.RoundGrid`
        (replies logged as they arrive; the upload round stops once it cannot succeed)."""
        return super().start(RoundGrid(grid, self.sites), *args, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        nodes = wait_for_nodes(grid, self.cfg.min_clients, self.cfg.server.wait_timeout)
        self.sites.names = node_names(grid)
        msgs = [self._message(RecordDict({"config": ConfigRecord(dict(config))}), MessageType.TRAIN, n) for n in nodes]
        self.sites.instruct(msgs, "train")
        who = ", ".join(self.sites.who(n) for n in nodes)
        log.info("phase 1/4 uploads: sending the personalization instruction to %d node(s): %s", len(nodes), who)
        self._t_sent = time.time()
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Intake, then the server pipeline; a site dropped on the way is rejected, naming it."""
        self.timings["clients"] = time.time() - self._t_sent
        self.sites.collect(replies)
        self.sites.require()
        log.info("phase 2/4 synthesis: screening and synthesizing from %d upload(s)", len(self.sites.accepted))
        store = SyntheticStore(self.synthetic_dir)
        kw = {"describe": self.sites.who, "workers": self.workers, "store": store, "progress": self.progress}
        synthesized = synthesize_uploads(self.components, dict(self.sites.accepted), self.cfg, **kw)
        self.timings["synthesis"], self.synthetic = synthesized.seconds, synthesized.shards
        self.sites.after_synthesis(synthesized.screening, synthesized.rejected)
        n = sum(len(s) for s in synthesized.shards.values())
        log.info("phase 3/4 classifier: training %s on %d synthetic images", self.cfg.classifier.arch, n)
        self.model = train_global(self.components, synthesized, self.cfg, self.progress)
        self.timings["classifier"] = self.model.timings["classifier"]
        metrics = {"num-synthetic": n, "num-accepted": len(self.model.order), **self.model.stats}
        return ArrayRecord(state_to_cpu(self.model.classifier)), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """The classifier for every instructed node still online, rejected sites included (a
        rejection is about one upload, not membership; their scores are kept apart)."""
        content = RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))})
        nodes = self.sites.to_evaluate(set(grid.get_node_ids()))
        msgs = [self._message(content, MessageType.EVALUATE, n) for n in nodes]
        self.sites.instruct(msgs, "evaluate")
        log.info("phase 4/4 evaluation: sending the classifier to %d node(s)", len(msgs))
        self._t_sent = time.time()
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The mean score over accepted sites, or None if none of them scored."""
        self.sites.score(replies)
        self.timings["evaluation"] = time.time() - self._t_sent
        s = self.sites.scores()
        if not s["accepted"]:
            return None
        return MetricRecord(
            {"accuracy-mean": s["mean"], "accuracy-weighted": s["weighted"], "num-clients": len(s["accepted"])}
        )

    def outcome(self) -> RunOutcome:
        """The run so far as one value (complete once ``start`` has returned)."""
        return RunOutcome(
            clients=sorted(self.sites.clients.values(), key=lambda r: (r.domain, r.node_id)),
            names=dict(self.sites.names),
            scores=self.sites.scores(),
            classifier=self.model.classifier if self.model else None,
            class_names=list(self.sites.class_names),
            synthetic=dict(self.synthetic),
            synthetic_dir=self.synthetic_dir,
            timings=dict(self.timings),
            model_source=str(self.components.source),
            model_fingerprint=str(self.components.fingerprint),
        )

    def summary(self) -> None:
        c = self.cfg
        log.info(
            "FedBiPStrategy: one-shot, min-clients=%d, synthesis x%d, %d DDIM steps, guidance %.1f, classifier %s %d epochs",
            c.min_clients,
            c.server.multiplier,
            c.server.inference_steps,
            c.server.guidance_scale,
            c.classifier.arch,
            c.classifier.epochs,
        )

    @staticmethod
    def _message(content: RecordDict, kind: str, nid: int) -> Message:
        return Message(content=content, message_type=kind, dst_node_id=nid)
