"""The server's one pipeline: validated uploads -> synthetic training set -> global classifier.

:func:`synthesize_uploads` then :func:`train_global` is what the ServerApp
(:class:`~fedbip_flower.federation.strategy.FedBiPStrategy`) runs after its intake, and what the benchmark's FedBiP methods run on the uploads of their
in-process clients, so the benchmark's ``fedbip`` row is the app's result for the same
config and seed.

Client order. Uploads are processed in the order of :func:`order_key`: the upload's domain,
then the SHA-256 of its content (:func:`upload_digest`: arrays and meta fields, not the
client's timing metrics). Node ids are not used (a deployment draws them at random), nor is
the reply order (network timing), nor a partition id (clients do not send one, and the
server could not check it). The key depends on the upload alone, so the app and the
benchmark, which hold the same uploads for the same seed, agree on it; with one domain per
site (feature shift) the order is simply alphabetical by domain.

Seed schedule. The client at position ``k`` of that order synthesizes with seed
``cfg.seed * 1000 + k`` (:func:`synthesis_seed`; ``k`` counts every upload handed in, also
one whose synthesis fails later); the training set is the concatenation of the clients'
images in that order; the classifier is trained with ``cfg.seed``. The global model thus
depends only on the set of uploads, the config and the seed.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from fedbip_flower.config import FedBiPConfig
from fedbip_flower.federation.payload import safe_text
from fedbip_flower.federation.synthetic_set import Shard, SyntheticSet, SyntheticStore
from fedbip_flower.federation.trust import Screening, screen_uploads
from fedbip_flower.method.synthesize import synthesize_client
from fedbip_flower.method.upload import ClientPayload
from fedbip_flower.models.classifier import train_classifier
from fedbip_flower.models.ldm import LDMComponents

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
Synthetic = tuple[torch.Tensor, torch.Tensor]  # uint8 images (M, 3, H, W), int64 labels (M,)


class PipelineError(RuntimeError):
    """The pipeline cannot build a model from these uploads."""


@dataclass
class GlobalModel:
    """What :func:`train_global` (and :func:`build_global_model`) returns."""

    classifier: torch.nn.Module  # eval mode, on CPU
    dataset: SyntheticSet  # the synthetic training set, in client order (read lazily from its store)
    order: list  # keys of the clients in the training set, in client order
    synthetic: dict  # key -> Shard (its images, in memory or in a file) of each client in ``order``
    rejected: dict = field(default_factory=dict)  # key -> why its upload was dropped
    screening: dict[Hashable, Screening] = field(default_factory=dict)  # key -> quota, findings, action
    stats: dict[str, float] = field(default_factory=dict)  # the classifier's training stats
    timings: dict[str, float] = field(default_factory=dict)  # seconds: synthesis, classifier

    @property
    def labels(self) -> torch.Tensor:
        return self.dataset.labels

    @property
    def images(self) -> torch.Tensor:
        """The whole synthetic set in memory (tests and small benchmarks)."""
        return self.dataset.tensors()[0]


def upload_digest(payload: ClientPayload) -> str:
    """SHA-256 (hex) of an upload's content: its arrays (in their wire dtypes) and meta fields.

    The client's metrics (timings among them) are left out: they differ from run to run
    while the upload does not."""
    h = hashlib.sha256()

    def add(*parts: object) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else repr(part).encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)

    add(
        payload.domain,
        list(payload.class_names),
        payload.template,
        int(payload.timestep),
        payload.injection,
        payload.model_fingerprint,
    )
    for name, tensor, dtype in (
        ("latents", payload.latents, torch.float16),
        ("labels", payload.labels, torch.int64),
        ("s", payload.s, torch.float32),
        ("v", payload.v, torch.float32),
        ("v_classes", payload.v_classes, torch.int64),
    ):
        arr = tensor.detach().to("cpu", dtype).contiguous().numpy()
        add(name, str(arr.dtype), tuple(arr.shape), arr.tobytes())
    return h.hexdigest()


def order_key(payload: ClientPayload) -> tuple[str, str]:
    """Where an upload goes in the client order: (domain, content digest)."""
    return payload.domain, upload_digest(payload)


def client_order(uploads: Mapping[K, ClientPayload]) -> list[K]:
    """The keys of ``uploads`` in client order (see the module docstring). Byte-identical
    uploads keep their input order; swapping them changes nothing in the training set."""
    keys = {k: order_key(p) for k, p in uploads.items()}
    return sorted(uploads, key=keys.__getitem__)


def synthesis_seed(seed: int, position: int) -> int:
    """The synthesis seed of the client at ``position`` of the client order."""
    return seed * 1000 + position


def synthesize_upload(
    components: LDMComponents, payload: ClientPayload, cfg: FedBiPConfig, seed: int, progress: bool = False
) -> Synthetic:
    """One client's synthetic images and labels (``cfg.server`` settings, seed ``seed``)."""
    return synthesize_client(
        components, payload, cfg.server, seed=seed, progress=progress, desc=f"synthesis {safe_text(payload.domain, 40)}"
    )


@dataclass
class Synthesized:
    """What :func:`synthesize_uploads` returns: the kept clients' images and what became of
    every upload."""

    class_names: list[str]
    store: SyntheticStore  # where the shards live
    shards: dict  # key -> Shard of each kept client, in client order
    rejected: dict  # key -> why its upload was dropped (synthesis failed, or another image shape)
    screening: dict[Hashable, Screening]  # key -> quota, findings, action, synthetic images, seconds
    seconds: float


def synthesize_uploads(
    components: LDMComponents,
    uploads: Mapping[K, ClientPayload],
    cfg: FedBiPConfig,
    *,
    describe: Callable[[K], str] = lambda key: f"upload {key}",
    workers: Sequence[LDMComponents] | None = None,
    store: SyntheticStore | None = None,
    progress: bool = False,
) -> Synthesized:
    """Validated uploads (any hashable key each, e.g. a node id) -> the synthetic training set.

    Steps: screen the uploads (:func:`~fedbip_flower.federation.trust.screen_uploads`: per-site
    quota, ``server.defence``, balanced shares; ``describe(key)`` names a client in the log);
    synthesize what is kept of each upload with its seed (:func:`synthesize_upload`), spread
    over ``workers`` (the LDM on each server device; default: ``components`` alone), each
    site's images put in ``store`` as soon as they are made (default: memory; the app's store
    writes files in the run folder); drop clients whose images have another shape than the
    majority's (one training set needs one image shape). A client whose synthesis fails or
    whose shape differs is dropped, never raised: see ``rejected``.

    A site's seed is its position in the client order, whichever worker makes its images, so
    the set is the same on one device or several. All uploads must share one class list (the
    app's intake keeps the majority's).
    """
    if not uploads:
        raise PipelineError("no uploads to build a model from")
    names = {tuple(p.class_names) for p in uploads.values()}
    if len(names) != 1:
        raise PipelineError(f"the uploads disagree on the class list ({len(names)} different lists)")
    workers = list(workers or [components])
    store = store if store is not None else SyntheticStore()
    t0 = time.time()
    order = client_order(uploads)
    screened = screen_uploads(components, uploads, order, cfg, describe)
    jobs = [(k, key) for k, key in enumerate(order) if key in screened.uploads]  # the rest: see its screening
    free: queue.SimpleQueue[LDMComponents] = queue.SimpleQueue()
    for w in workers:
        free.put(w)

    def job(k: int, key: K):
        worker = free.get()
        t_site = time.time()
        try:
            payload = screened.uploads[key]
            x, y = synthesize_upload(worker, payload, cfg, synthesis_seed(cfg.seed, k), progress and len(workers) == 1)
            return store.put(key, k, payload.domain, x, y), time.time() - t_site
        finally:
            free.put(worker)

    shards: dict[K, Shard] = {}
    rejected: dict[K, str] = {}
    pool = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="synthesis")
    try:
        futures = {key: pool.submit(job, k, key) for k, key in jobs}
        for n, (_, key) in enumerate(jobs, 1):
            try:
                shard, seconds = futures[key].result()
            except Exception as err:  # noqa: BLE001 - one client's upload must not stop the run
                rejected[key] = f"synthesis from its upload failed: {type(err).__name__}: {err}"
                continue
            shards[key] = shard
            # the server's work for this site, reported with its screening
            screened.screening[key].synthetic = len(shard)
            screened.screening[key].synthesis_seconds = round(seconds, 2)
            log.info("synthesis %d/%d: %d images for %s in %.1f s", n, len(jobs), len(shard), describe(key), seconds)
    finally:  # stopping (Ctrl-C): the sites not started are not started
        pool.shutdown(wait=True, cancel_futures=True)
    shapes = {key: shard.shape for key, shard in shards.items()}
    if shapes:
        common, _ = Counter(shapes.values()).most_common(1)[0]
        for key, shape in shapes.items():
            if shape != common:
                del shards[key]
                store.drop(key)
                rejected[key] = f"its upload synthesizes images of shape {shape}, the others' are {common}"
    seconds = time.time() - t0
    log.info("synthesized %d images from %d upload(s) in %.1f s", sum(map(len, shards.values())), len(shards), seconds)
    return Synthesized(list(next(iter(names))), store, shards, rejected, screened.screening, seconds)


def train_global(
    components: LDMComponents, synthesized: Synthesized, cfg: FedBiPConfig, progress: bool = False
) -> GlobalModel:
    """The global classifier, trained (seed ``cfg.seed``) on the kept clients' synthetic images,
    read from their store batch by batch."""
    if not synthesized.shards:
        raise PipelineError("no upload was left to train on after synthesis")
    kept = list(synthesized.shards)
    data = synthesized.store.dataset(kept)
    t0 = time.time()
    num_classes = len(synthesized.class_names)
    classifier, stats = train_classifier(data, None, num_classes, cfg.classifier, cfg.seed, components.device, progress)
    return GlobalModel(
        classifier=classifier,
        dataset=data,
        order=kept,
        synthetic=dict(synthesized.shards),
        rejected=dict(synthesized.rejected),
        screening=synthesized.screening,
        stats=stats,
        timings={"synthesis": synthesized.seconds, "classifier": time.time() - t0},
    )


def build_global_model(
    components: LDMComponents, uploads: Mapping[K, ClientPayload], cfg: FedBiPConfig, **options
) -> GlobalModel:
    """:func:`synthesize_uploads` then :func:`train_global`, for callers whose every upload
    must be usable (the benchmark's honest clients, the scale runs): an upload dropped on the
    way raises :class:`PipelineError` naming its key. The ServerApp runs the two steps itself,
    rejecting such a client instead. ``options``: those of :func:`synthesize_uploads`."""
    synthesized = synthesize_uploads(components, uploads, cfg, **options)
    if synthesized.rejected:
        raise PipelineError("; ".join(f"client {key}: {why}" for key, why in synthesized.rejected.items()))
    return train_global(components, synthesized, cfg, options.get("progress", False))
