"""What a ClientApp does, without Flower's Context: personalize (train) and score (evaluate)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedbip_flower import __version__
from fedbip_flower.config import FedBiPConfig
from fedbip_flower.data.loading import ClientData, DataError, NodeConfig, load_client_data
from fedbip_flower.federation.payload import META, UPLOAD, to_record_dict
from fedbip_flower.jsonio import write_json
from fedbip_flower.method.embeddings import PRESETS
from fedbip_flower.method.personalize import first_inference_timestep, personalize
from fedbip_flower.method.upload import ClientPayload
from fedbip_flower.models.classifier import build_classifier, evaluate
from fedbip_flower.models.ldm import load_components, pick_device

log = logging.getLogger(__name__)
_FLOWER_KEYS = ("server-round",)
RESULTS_KEY = "results-dir"  # node config: where a site keeps the classifier it receives and its score


class SiteError(RuntimeError):
    """What a site tells the server when its work fails: the reason, with the site's local
    paths replaced by placeholders (the full error stays in the site's own log)."""


def redact(text: str, node_config: dict[str, Any]) -> str:
    """``text`` without this site's local paths: its data and results folders (as given and
    resolved), the working directory and the home directory become ``<data-dir>``,
    ``<results-dir>``, ``<cwd>``, ``<home>``."""
    places = []
    for key, tag in (("data-dir", "<data-dir>"), (RESULTS_KEY, "<results-dir>")):
        value = str(node_config.get(key, "") or "")
        if value:
            places += [(value, tag), (str(Path(value).expanduser().resolve()), tag)]
    places += [(os.getcwd(), "<cwd>"), (str(Path.home()), "<home>")]
    for value, tag in sorted(places, key=lambda p: -len(p[0])):  # longest first: a data-dir under home
        if len(value) > 1:
            text = text.replace(value, tag)
    return text


def config_from_record(record: ConfigRecord | dict[str, Any]) -> FedBiPConfig:
    """The server sends the whole parsed run config; parse it again (never trust it blindly)."""
    flat = {k: v for k, v in dict(record).items() if k not in _FLOWER_KEYS}
    return FedBiPConfig.from_run_config(flat)


def template_for(cfg: FedBiPConfig) -> str:
    return cfg.client.template or PRESETS[cfg.data.preset]


def client_seed(cfg: FedBiPConfig, node: NodeConfig) -> int:
    return cfg.seed * 7919 + node.partition_id


class SiteDataError(DataError):
    """A site's data cannot give both a training and a test split with this run's config."""


def site_name(data: ClientData, node: NodeConfig) -> str:
    where = f"data-dir {node.data_dir}" if node.data_dir else f"partition {node.partition_id} of {node.num_partitions}"
    return f"site {data.domain!r} ({where})"


def check_site_data(data: ClientData, cfg: FedBiPConfig, node: NodeConfig) -> None:
    """Raise SiteDataError, naming the site and its counts, unless its data gives both a
    training and a test split. Runs before any personalization work, so a site that could
    never score the classifier says so at once instead of after the whole round."""
    n_train, n_test = len(data.train_labels), len(data.test_labels)
    if n_train and n_test:
        return
    labels = torch.cat([data.train_labels, data.test_labels])
    counts = torch.bincount(labels).tolist() if len(labels) else []
    per_class = [c for c in counts if c]
    fewest = min(per_class) if per_class else 0
    more = (
        f"`python -m fedbip_flower.tools.deploy make-site-data ... --per-class {cfg.data.shots + 8}`"
        if node.data_dir
        else f"data.per-class={cfg.data.shots + 8} for the bundled data"
    )
    hint = f"give each class more than data.shots={cfg.data.shots} images (e.g. {more})"
    if fewest >= 2:
        hint += f" or run with data.shots={fewest // 2}"
    raise SiteDataError(
        f"{site_name(data, node)}: {len(labels)} image(s) in {len(per_class)} class(es) "
        f"({fewest}-{max(per_class, default=0)} per class) give {n_train} training and {n_test} test "
        f"image(s) with data.shots={cfg.data.shots}; a site needs both to take part: {hint}"
    )


def personalize_site(cfg: FedBiPConfig, node_config: dict[str, Any], progress: bool = True) -> ClientPayload:
    """Load this site's data, check it splits into training and test images, run bi-level
    personalization: the site's upload, as a payload."""
    node = NodeConfig.from_node_config(node_config)
    t0 = time.perf_counter()
    data = load_client_data(cfg.data, node, cfg.seed)
    data_seconds = time.perf_counter() - t0
    log.info(
        "data: %d training and %d test image(s) in %d class(es), domain %r (%.1f s)",
        len(data.train_labels),
        len(data.test_labels),
        len(data.class_names),
        data.domain,
        data_seconds,
    )
    check_site_data(data, cfg, node)
    comps = load_components(cfg.model.id, cfg.client.device, cfg.model.dtype)
    t = cfg.client.timestep or first_inference_timestep(comps.scheduler, cfg.server.inference_steps)
    log.info(
        "personalization: %d concept step(s) on %s, torch threads %d",
        cfg.client.steps,
        comps.device,
        torch.get_num_threads(),
    )
    payload = personalize(comps, data, cfg.client, template_for(cfg), t, client_seed(cfg, node), progress)
    payload.metrics["data-seconds"] = data_seconds
    return payload


def run_train(config: ConfigRecord | dict[str, Any], node_config: dict[str, Any], progress: bool = True) -> RecordDict:
    """Personalize this site (:func:`personalize_site`) and return the one upload."""
    content = to_record_dict(personalize_site(config_from_record(config), node_config, progress))
    log.info("upload: %.2f MB to the server (noised latents, labels, concept embeddings)", _mb(content))
    return content


def _mb(content: RecordDict) -> float:
    return content.array_records[UPLOAD].count_bytes() / 2**20


def run_evaluate(
    arrays_state: dict[str, torch.Tensor],
    config: ConfigRecord | dict[str, Any],
    node_config: dict[str, Any],
    run_id: int | str = "",
) -> RecordDict:
    """Score the global classifier on this site's private test split; with ``results-dir``
    in the node config, keep the classifier and the score there (:func:`save_site_result`)."""
    cfg = config_from_record(config)
    node = NodeConfig.from_node_config(node_config)
    data = load_client_data(cfg.data, node, cfg.seed)
    fc = arrays_state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise ValueError("the classifier sent by the server has no valid fc.weight")
    # The weights come from the server; the client needs no pretrained file of its own.
    model = build_classifier(dataclasses.replace(cfg.classifier, pretrained=""), int(fc.shape[0]))
    model.load_state_dict(arrays_state, strict=True)
    acc = evaluate(model, data.test_images, data.test_labels, pick_device(cfg.client.device))
    n = len(data.test_labels)
    log.info("evaluation: run %s, accuracy %s on %d test image(s) of this site", run_id, f"{acc:.4f}" if n else "-", n)
    folder = str(node_config.get(RESULTS_KEY, "") or "")
    if folder:
        try:
            where = save_site_result(Path(folder), run_id, arrays_state, acc if n else None, n, data)
            log.info("kept the classifier and this site's score in %s", where)
        except OSError as err:  # the score still goes to the server
            log.error("could not keep the classifier in %s: %s", folder, err)
    return RecordDict(
        {
            "metrics": MetricRecord({"accuracy": acc, "num-examples": n}),
            META: ConfigRecord({"domain": data.domain}),
        }
    )


def save_site_result(
    folder: Path,
    run_id: int | str,
    state: dict[str, torch.Tensor],
    accuracy: float | None,
    num_test: int,
    data: ClientData,
) -> Path:
    """Write ``<folder>/run<run_id>/classifier.safetensors`` (the weights the server sent) and
    ``score.json`` (run id, this site's accuracy and test count, domain, class names, time),
    and append the score to ``<folder>/scores.jsonl``; returns the run's folder."""
    from safetensors.torch import save_file

    out = Path(folder).expanduser().resolve() / f"run{run_id or 'unknown'}"
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(weights, str(out / "classifier.safetensors"), metadata={"class_names": json.dumps(data.class_names)})
    score = {
        "run_id": str(run_id),
        "accuracy": accuracy,
        "num_test": num_test,
        "domain": data.domain,
        "class_names": list(data.class_names),
        "classifier": "classifier.safetensors",
        "saved_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fedbip_flower_version": __version__,
    }
    write_json(out / "score.json", score)
    with open(out.parent / "scores.jsonl", "a") as fh:
        fh.write(json.dumps({k: score[k] for k in ("run_id", "accuracy", "num_test", "domain", "saved_at")}) + "\n")
    return out
