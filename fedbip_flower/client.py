"""What a ClientApp does, without Flower's Context: personalize (train) and score (evaluate)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedbip_flower.classifier import build_classifier, evaluate
from fedbip_flower.config import FedBiPConfig
from fedbip_flower.data import NodeConfig, load_client_data
from fedbip_flower.embeddings import PRESETS
from fedbip_flower.ldm import load_components, pick_device
from fedbip_flower.payload import META
from fedbip_flower.personalize import first_inference_timestep, personalize

log = logging.getLogger(__name__)
_FLOWER_KEYS = ("server-round",)


def config_from_record(record: ConfigRecord | dict[str, Any]) -> FedBiPConfig:
    """The server sends the whole parsed run config; parse it again (never trust it blindly)."""
    flat = {k: v for k, v in dict(record).items() if k not in _FLOWER_KEYS}
    return FedBiPConfig.from_run_config(flat)


def template_for(cfg: FedBiPConfig) -> str:
    return cfg.client.template or PRESETS[cfg.data.preset]


def client_seed(cfg: FedBiPConfig, node: NodeConfig) -> int:
    return cfg.seed * 7919 + node.partition_id


def run_train(config: ConfigRecord | dict[str, Any], node_config: dict[str, Any],
              progress: bool = True) -> RecordDict:  # fmt: skip
    """Load this site's data, run bi-level personalization, return the one upload."""
    cfg = config_from_record(config)
    node = NodeConfig.from_node_config(node_config)
    data = load_client_data(cfg.data, node, cfg.seed)
    comps = load_components(cfg.model.id, cfg.client.device, cfg.model.dtype)
    t = cfg.client.timestep or first_inference_timestep(comps.scheduler, cfg.server.inference_steps)
    payload = personalize(comps, data, cfg.client, template_for(cfg), t, client_seed(cfg, node), progress)
    return payload.to_record_dict()


def run_evaluate(arrays_state: dict[str, torch.Tensor], config: ConfigRecord | dict[str, Any],
                 node_config: dict[str, Any]) -> RecordDict:  # fmt: skip
    """Score the global classifier on this site's private test split."""
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
    log.info("client %s: accuracy %.4f on %d test images", data.domain, acc, len(data.test_labels))
    return RecordDict(
        {
            "metrics": MetricRecord({"accuracy": acc, "num-examples": len(data.test_labels)}),
            META: ConfigRecord({"domain": data.domain}),
        }
    )
