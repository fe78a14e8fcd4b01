"""The package's log lines on the console of a Flower process.

Flower prints its own ``flwr`` logger through its console handler; in a ServerApp process
that output is mirrored to the SuperLink (``flwr run --stream``, ``flwr log``), and a
ClientApp's output lands in its SuperExec's log on the site. This package logs under
``fedbip_flower``, which has no handler of its own: without this its INFO lines (phases,
progress, scores) would be dropped in both places.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

PACKAGE_LOGGER = "fedbip_flower"


@contextlib.contextmanager
def console_logging(level: int = logging.INFO) -> Iterator[logging.Logger]:
    """While inside, the package's lines at ``level`` and above go through Flower's console
    handler (same format and stream as Flower's own lines); restored on exit."""
    from flwr.common.logger import console_handler

    lg = logging.getLogger(PACKAGE_LOGGER)
    added = console_handler not in lg.handlers
    old_level = lg.level
    if added:
        lg.addHandler(console_handler)
    if lg.level == logging.NOTSET or lg.level > level:
        lg.setLevel(level)
    try:
        yield lg
    finally:
        if added:
            lg.removeHandler(console_handler)
        lg.setLevel(old_level)
