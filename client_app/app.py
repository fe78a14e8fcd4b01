"""FedBiP ClientApp: one personalization upload (train) and one evaluation."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported)
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedbip_flower.federation.client import SiteError, redact, run_evaluate, run_train
from fedbip_flower.federation.console import console_logging

app = ClientApp()


@contextlib.contextmanager
def site_task(context: Context) -> Iterator[None]:
    """The site's own log shows this package's lines (phases, progress, score); a failure
    reaches the server as a SiteError without the site's local paths (Flower logs the full
    error, cause included, on the site)."""
    with console_logging():
        try:
            yield
        except Exception as err:
            raise SiteError(redact(f"{type(err).__name__}: {err}", context.node_config)) from err


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Personalize the frozen LDM on this site's few-shot data and upload once."""
    # The server sends the whole run config; the node config names this site's data.
    # Per-step progress bars only on an interactive terminal: in simulation every client's bar
    # would be relayed through Ray, hundreds of interleaved lines; the client logs one line
    # per phase (and per quarter of its concept steps) instead.
    with site_task(context):
        content = run_train(msg.content["config"], context.node_config, progress=sys.stderr.isatty())
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global classifier on this site's private test split (and keep it, with the
    score, where the node config's ``results-dir`` says)."""
    with site_task(context):
        state = msg.content["arrays"].to_torch_state_dict()
        content = run_evaluate(state, msg.content["config"], context.node_config, context.run_id)
    return Message(content=content, reply_to=msg)
