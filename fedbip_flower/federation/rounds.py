"""The Grid the strategy runs on: the SuperLink's nodes and names, and a round loop that reports
replies as they arrive and stops the upload round once it cannot succeed."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedbip_flower.federation.payload import safe_text
from fedbip_flower.federation.sites import FedBiPError, Sites

log = logging.getLogger(__name__)


def node_names(grid: Grid) -> dict[int, str]:
    """The names the nodes were registered with (``flwr supernode register --name``), as
    bounded printable text; {} where the Grid knows none (simulation)."""
    try:
        return {int(n.node_id): safe_text(n.name, 40) for n in grid.get_nodes() if getattr(n, "name", "")}
    except Exception as err:  # noqa: BLE001 - names only decorate log lines
        log.debug("no node names: %s", err)
        return {}


def wait_for_nodes(grid: Grid, need: int, timeout: float) -> list[int]:
    """The connected nodes, once at least ``need`` are (sorted); FedBiPError after ``timeout`` s."""
    deadline = time.time() + timeout
    nodes = list(grid.get_node_ids())
    if len(nodes) < need:
        log.info("waiting for %d node(s) (%d online; at most %.0f s)", need, len(nodes), timeout)
    while len(nodes) < need and time.time() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    if len(nodes) < need:
        raise FedBiPError(f"only {len(nodes)} node(s) connected after {timeout:.0f} s; min-clients is {need}")
    return sorted(nodes)


class RoundGrid(Grid):
    """The run's Grid, with a ``send_and_receive`` that reports replies as they arrive and
    stops the upload round early.

    Flower's own loop waits for every reply or the round timeout. Here each reply is logged
    when it arrives (``upload n/N: received from node ...``); in the upload round, once the
    replies that failed leave fewer possible uploads than ``min-clients``, the round stops at
    once: the run cannot complete, so the server fails with the reason instead of waiting for
    the other sites to finish their work. Everything else is the wrapped Grid's.
    """

    def __init__(self, grid: Grid, sites: Sites):
        self.grid, self.sites = grid, sites

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
        total, need = len(pending), self.sites.min_clients
        end = time.time() + (timeout if timeout is not None else math.inf)
        interval = float(getattr(self.grid, "pull_interval", 3.0))
        replies: list[Message] = []
        failed = 0
        while pending and time.time() < end:
            for rep in self.grid.pull_messages(pending):
                pending.discard(rep.metadata.reply_to_message_id)
                replies.append(rep)
                failed += int(rep.has_error())
                self._report(kind, rep, len(replies), total)
            if pending and kind == MessageType.TRAIN and total - failed < need:
                self.sites.stopped_early = (
                    f"no reply yet when the round stopped: {failed} of {total} site(s) failed, so at most "
                    f"{total - failed} upload(s) can arrive and min-clients is {need}"
                )
                log.error("upload round stopped early: %s", self.sites.stopped_early.split(": ", 1)[1])
                break
            if pending:
                time.sleep(interval)
        return replies

    def _report(self, kind: str, rep: Message, n: int, total: int) -> None:
        try:
            who = self.sites.who(self.sites.sender(rep))
        except Exception:  # noqa: BLE001 - the intake reports unreadable replies
            who = "an unknown node"
        what = "upload" if kind == MessageType.TRAIN else "evaluation"
        if rep.has_error():
            log.warning("%s %d/%d: %s failed: %s", what, n, total, who, safe_text(rep.error.reason, 300))
        else:
            log.info("%s %d/%d: received from %s", what, n, total, who)
