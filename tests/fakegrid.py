"""An in-process Grid that routes messages to the real ClientApp (Flower's testing recipe)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from tests import helpers


def set_task_identity() -> None:
    # Building a Message outside a running Flower task needs a run id (internal API).
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1


def instruction(content: RecordDict, message_type: str, dst: int) -> Message:
    """A server->client message with explicit metadata, as the SuperLink would deliver it."""
    return helpers.instruction(dst, message_type, content)


class FakeGrid(Grid):
    """``push_messages`` calls ``client_app(msg, context)`` for each node; ``pull_messages``
    hands out the replies.

    ``tamper[node] = fn(reply) -> reply`` rewrites a node's train reply (a hostile client);
    nodes in ``lost`` never answer (the round waits for its timeout).
    """

    def __init__(
        self,
        node_configs: dict[int, dict],
        client_app: Callable,
        tamper: dict[int, Callable] | None = None,
        lost: Iterable[int] = (),
    ):
        self.node_configs = node_configs
        self.client_app = client_app
        self.tamper = tamper or {}
        self.lost = set(lost)
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return instruction(content, message_type, dst_node_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    pull_interval = 0.01  # seconds between pulls (Flower's in-memory grid has the same attribute)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message to its node's ClientApp at once; its reply waits for a pull."""
        ids = []
        for m in messages:
            nid = m.metadata.dst_node_id
            sent = instruction(m.content, m.metadata.message_type, nid)
            m.metadata.__dict__["_message_id"] = sent.metadata.message_id  # as Flower's grids do
            self.sent.append(sent)
            ids.append(sent.metadata.message_id)
            if nid in self.lost:
                continue
            ctx = Context(run_id=1, node_id=nid, node_config=self.node_configs[nid], state=RecordDict(), run_config={})
            try:
                rep = self.client_app(sent, ctx)
            except Exception as err:  # what Flower does when a ClientApp raises
                rep = Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=sent)
            if sent.metadata.message_type == "train" and nid in self.tamper:
                rep = self.tamper[nid](rep)
            self.replies[sent.metadata.message_id] = rep
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's loop (the strategy replaces it with its own, which uses push and pull)."""
        ids = set(self.push_messages(messages))
        return self.pull_messages(ids)
