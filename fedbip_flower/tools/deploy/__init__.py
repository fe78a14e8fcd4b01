"""Multi-site deployment of the FedBiP app: site data, Flower commands, bring-up helpers.

The topology is Flower 1.42's "process isolation" (the same as ``docker/compose.yml``)::

    SuperLink  (Fleet + Control + Runtime APIs on one port; TLS; SuperNode auth)
      +-- flower-superexec          runs the ServerApp      (--root-certificates)
    site N: SuperNode (--isolation process, Runtime API on 127.0.0.1:<9093+N>)
      +-- flower-superexec          runs the site's ClientApp

The scripts in ``scripts/deploy/`` are thin wrappers around this package's command line
(``python -m fedbip_flower.tools.deploy --help``), and ``tests/test_deployment.py`` builds its
loopback deployment from the same functions, so the commands the docs show are the
commands the test runs.

Every role keeps its state in its own folder under the deployment folder (default
``./deploy``): ``superlink/`` (``state.db``, logs, SuperExec secret, ``flwr-home``) and
``site-N/`` (logs, SuperExec secret, ``flwr-home``). ``FLWR_HOME`` of a role is always
``<its folder>/flwr-home``; the ``flwr`` CLI uses ``$FLWR_HOME`` or ``./deploy/flwr-home``.

One module per job, each importing only the ones listed before it:

- ``common``: the error type and the default ports, connection name and deployment folder
- ``sitedata``: a site's data folder from the bundled benchmark
- ``commands``: each role's Flower command lines and environment
- ``flwrcli``: ``flwr`` CLI calls (register SuperNodes, list them, wait until online)
- ``roles``: running a role's processes (in the background or the foreground)
- ``deployment``: a whole loopback deployment (test, quick try) and the checked run
- ``status``: the operator's status screen
- ``cli``: the command line; ``__main__`` runs it

The names below are the package's API, importable from ``fedbip_flower.tools.deploy``.
"""

from fedbip_flower.tools.deploy.cli import HANDLERS, main
from fedbip_flower.tools.deploy.commands import (
    ensure_secret,
    fair_threads,
    is_loopback,
    need_file,
    node_config,
    role_env,
    site_commands,
    superlink_commands,
    thread_env,
)
from fedbip_flower.tools.deploy.common import (
    DEFAULT_CONNECTION,
    DEFAULT_DEPLOY_DIR,
    SITE_PORT_BASE,
    SUPERLINK_PORT,
    DeployError,
)
from fedbip_flower.tools.deploy.deployment import (
    Deployment,
    checked_run,
    quick_try,
    report_run,
    run_script,
    scripts_dir,
)
from fedbip_flower.tools.deploy.flwrcli import (
    NAMES_FILE,
    cli_home,
    flwr_cli,
    node_names,
    register_node,
    remember_name,
    supernodes,
    wait_online,
)
from fedbip_flower.tools.deploy.roles import hint, serve, start_role
from fedbip_flower.tools.deploy.sitedata import (
    APP_SHOTS,
    SITE_PER_CLASS,
    SITE_STYLES,
    SITE_TEST_PER_CLASS,
    site_style,
    split_note,
    write_site,
)
from fedbip_flower.tools.deploy.status import run_progress, status_report

__all__ = [
    "APP_SHOTS",
    "DEFAULT_CONNECTION",
    "DEFAULT_DEPLOY_DIR",
    "HANDLERS",
    "NAMES_FILE",
    "SITE_PER_CLASS",
    "SITE_PORT_BASE",
    "SITE_STYLES",
    "SITE_TEST_PER_CLASS",
    "SUPERLINK_PORT",
    "DeployError",
    "Deployment",
    "checked_run",
    "cli_home",
    "ensure_secret",
    "fair_threads",
    "flwr_cli",
    "hint",
    "is_loopback",
    "main",
    "need_file",
    "node_config",
    "node_names",
    "quick_try",
    "register_node",
    "remember_name",
    "report_run",
    "role_env",
    "run_progress",
    "run_script",
    "scripts_dir",
    "serve",
    "site_commands",
    "site_style",
    "split_note",
    "start_role",
    "status_report",
    "superlink_commands",
    "supernodes",
    "thread_env",
    "wait_online",
    "write_site",
]
