"""FedBiP ClientApp: one personalization upload (train) and one evaluation."""

from __future__ import annotations

import sys

import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported)
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedbip_flower.federation.client import run_evaluate, run_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Personalize the frozen LDM on this site's few-shot data and upload once."""
    # The server sends the whole run config; the node config names this site's data.
    # Per-step progress bars only on an interactive terminal: in simulation every client's bar
    # would be relayed through Ray, hundreds of interleaved lines; the client logs one line
    # per phase instead.
    content = run_train(msg.content["config"], context.node_config, progress=sys.stderr.isatty())
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global classifier on this site's private test split."""
    state = msg.content["arrays"].to_torch_state_dict()
    content = run_evaluate(state, msg.content["config"], context.node_config)
    return Message(content=content, reply_to=msg)
