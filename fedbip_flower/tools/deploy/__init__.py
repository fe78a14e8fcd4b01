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
"""
