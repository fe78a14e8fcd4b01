"""FedBiP ServerApp: one upload round, synthesis + classifier, one evaluation round."""

from __future__ import annotations

import sys

import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported)
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbip_flower.federation.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedBiP with the run config; a failure of the run propagates so it is marked failed.

    A bad client never fails the run (it is rejected, with a reason naming its node); a
    classifier that no accepted site could score completes with results.json status
    ``unscored``, which explains why and names the classifier file.
    """
    run_server(grid, dict(context.run_config), run_id=context.run_id, progress=sys.stderr.isatty())
