"""The command line ``python -m fedbip_flower.tools.deploy`` (what ``scripts/deploy/*.sh`` run):
the argument parser and one handler per subcommand (``HANDLERS``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedbip_flower.config import DataConfig
from fedbip_flower.data import shapes
from fedbip_flower.data.loading import DataError, shrink_imagefolder
from fedbip_flower.tools.deploy.commands import (
    ensure_secret,
    fair_threads,
    is_loopback,
    need_file,
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
from fedbip_flower.tools.deploy.deployment import checked_run, quick_try, report_run
from fedbip_flower.tools.deploy.flwrcli import cli_home, register_node
from fedbip_flower.tools.deploy.roles import serve
from fedbip_flower.tools.deploy.sitedata import (
    APP_SHOTS,
    SITE_PER_CLASS,
    SITE_STYLES,
    SITE_TEST_PER_CLASS,
    site_style,
    split_note,
    write_site,
)
from fedbip_flower.tools.deploy.status import status_report
from fedbip_flower.tools.launch import LaunchError, flower_env, project_root, write_connection
from fedbip_flower.tools.supervise import RoleBusy, RoleLock


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run its subcommand's handler; returns the exit code (1 on bad input)."""
    p = argparse.ArgumentParser(
        prog="python -m fedbip_flower.tools.deploy",
        description="FedBiP multi-site deployment helpers (see docs/deployment.md).",
    )
    p.add_argument(
        "--deploy-dir",
        type=Path,
        default=DEFAULT_DEPLOY_DIR,
        help="deployment folder holding each role's state (default: ./deploy)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser(
        "make-site-data",
        help="write a site's data folder from the bundled benchmark",
        description="Write OUT_DIR/train/metadata.csv (file_name,label,domain), "
        "OUT_DIR/train/<class>/*.png and OUT_DIR/classes.txt from the bundled "
        "FedBiP-Shapes benchmark: one style (domain), 10 classes.",
    )
    s.add_argument("out_dir", type=Path, help="the site folder (a node config's data-dir)")
    s.add_argument(
        "style",
        nargs="?",
        default=None,
        help=f"one of: {', '.join(shapes.STYLES)} (default: site N's held-out style, "
        f"N=1..{len(SITE_STYLES)}: {', '.join(SITE_STYLES)})",
    )
    s.add_argument("--site", type=int, default=1, help="site number; picks the default style")
    s.add_argument(
        "--per-class",
        type=int,
        default=SITE_PER_CLASS,
        help=f"images per class (default {SITE_PER_CLASS}: the app's data.shots={APP_SHOTS} "
        f"training + {SITE_TEST_PER_CLASS} test images; use more than data.shots)",
    )
    s.add_argument("--seed", type=int, default=0, help="rendering seed (default 0)")
    s.add_argument("--resolution", type=int, default=32, choices=shapes.SUPPORTED_RESOLUTIONS)
    s.add_argument(
        "--framing", default=DataConfig().framing, choices=tuple(shapes.FRAMINGS), help="object size (data.framing)"
    )
    s.add_argument("--force", action="store_true", help="rewrite an existing folder's train/")

    s = sub.add_parser(
        "shrink-data",
        help="copy an imagefolder at the pipeline's resolution (lossless PNG)",
        description="Copy SRC (train/metadata.csv + images) to DST at --resolution as PNG: "
        "it loads to exactly the same tensors at that data.resolution, and is much smaller.",
    )
    s.add_argument("src", type=Path)
    s.add_argument("dst", type=Path)
    s.add_argument("--resolution", type=int, default=32)

    s = sub.add_parser("superlink", help="run the SuperLink + ServerApp SuperExec in the foreground")
    s.add_argument("--certs", type=Path, default=None, help="make-certs.sh folder (default: <deploy-dir>/certs)")
    s.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode auth (loopback quick try only)")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=SUPERLINK_PORT)

    s = sub.add_parser("site", help="run site N's SuperNode + ClientApp SuperExec in the foreground")
    s.add_argument("site", type=int)
    s.add_argument("data_dir", type=Path)
    s.add_argument("--superlink", default=f"127.0.0.1:{SUPERLINK_PORT}", help="SuperLink host:port")
    s.add_argument(
        "--ca", type=Path, default=None, help="SuperLink CA certificate (default: <deploy-dir>/certs/ca.crt)"
    )
    s.add_argument("--key", type=Path, default=None, help="private node key (default: <deploy-dir>/keys/nodeN)")
    s.add_argument("--port", type=int, default=None, help="Runtime API port (default: 9093 + N)")
    s.add_argument("--num-sites", type=int, default=3)
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads of this site (OMP_NUM_THREADS); default: with a loopback SuperLink (all "
        "sites on this machine) cores / --num-sites, else all cores",
    )
    s.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where the site keeps each run's classifier and score (default: <deploy-dir>/site-N/results)",
    )
    s.add_argument("--insecure", action="store_true", help="no TLS, no node key (loopback quick try only)")

    s = sub.add_parser("connection", help="write the flwr CLI connection into $FLWR_HOME/config.toml")
    s.add_argument("--name", default=DEFAULT_CONNECTION)
    s.add_argument("--superlink", default=f"127.0.0.1:{SUPERLINK_PORT}")
    s.add_argument("--ca", type=Path, default=None, help="CA certificate (default: <deploy-dir>/certs/ca.crt)")
    s.add_argument("--insecure", action="store_true")

    s = sub.add_parser("register", help="flwr supernode register each public key")
    s.add_argument("public_keys", type=Path, nargs="+")
    s.add_argument("--connection", default=DEFAULT_CONNECTION)

    s = sub.add_parser("run", help="flwr run + real status check + results summary")
    s.add_argument("--connection", default=DEFAULT_CONNECTION)
    s.add_argument("--app", type=Path, default=None)
    s.add_argument("--output-dir", type=Path, default=None, help="default: <deploy-dir>/outputs")
    s.add_argument("--run-config", default="")
    s.add_argument("--timeout", type=float, default=3600)

    s = sub.add_parser(
        "status",
        help="one screen: the sites, the runs, and the latest (or --run-id) run's phase and scores",
        description="Reads the SuperLink through the flwr CLI (flwr supernode ls, flwr ls, flwr log): "
        "works from any machine with a connection; site names come from register's record.",
    )
    s.add_argument("--connection", default=DEFAULT_CONNECTION)
    s.add_argument("--run-id", type=int, default=None, help="default: the latest run")

    s = sub.add_parser("quick-try", help="insecure loopback deployment: 1 SuperLink + N sites, one run, stop")
    s.add_argument("--num-sites", type=int, default=3)
    s.add_argument(
        "--per-class",
        type=int,
        default=SITE_PER_CLASS,
        help=f"images per class in each generated site folder (default {SITE_PER_CLASS})",
    )
    s.add_argument("--app", type=Path, default=None)
    s.add_argument("--run-config", default="")
    s.add_argument("--timeout", type=float, default=3600)

    for name, handler in HANDLERS.items():
        sub.choices[name].set_defaults(handler=handler)
    a = p.parse_args(argv)
    a.deploy_dir = a.deploy_dir.resolve()
    try:
        return a.handler(a)
    except (DeployError, LaunchError, DataError, RoleBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _make_site_data(a: argparse.Namespace) -> int:
    style = a.style or site_style(a.site)
    out = write_site(a.out_dir, style, a.per_class, a.seed, a.resolution, a.force, a.framing)
    print(
        f"wrote {out} ({len(shapes.CLASSES)} classes x {a.per_class} images, domain {style!r}; {split_note(a.per_class)})"
    )
    return 0


def _shrink_data(a: argparse.Namespace) -> int:
    n = shrink_imagefolder(a.src, a.dst, a.resolution)
    print(f"wrote {n} images at {a.resolution} px to {a.dst}")
    return 0


def _superlink(a: argparse.Namespace) -> int:
    role = a.deploy_dir / "superlink"
    with RoleLock(role, "the SuperLink"):  # a second start is refused before it touches anything
        certs = None if a.insecure else (a.certs or a.deploy_dir / "certs")
        secret = ensure_secret(role / "superexec.secret")
        cmds = superlink_commands(role, port=a.port, host=a.host, certs_dir=certs, secret=secret)
        mode = "INSECURE" if a.insecure else "TLS + SuperNode auth"
        print(f"SuperLink role folder: {role} ({mode})", flush=True)
        return serve(cmds, role_env(role), role, {"superlink": a.port})


def _site(a: argparse.Namespace) -> int:
    dd = a.deploy_dir
    role = dd / f"site-{a.site}"
    with RoleLock(role, f"site {a.site}"):
        port = a.port or SITE_PORT_BASE + a.site
        results = (a.results_dir or role / "results").resolve()
        cmds = site_commands(
            a.site,
            a.data_dir,
            superlink=a.superlink,
            port=port,
            root_cert=None if a.insecure else (a.ca or dd / "certs" / "ca.crt"),
            key=None if a.insecure else (a.key or dd / "keys" / f"node{a.site}"),
            secret=ensure_secret(role / "superexec.secret"),
            num_sites=a.num_sites,
            results_dir=results,
        )
        threads = a.threads or (fair_threads(a.num_sites) if is_loopback(a.superlink) else None)
        print(
            f"site {a.site} role folder: {role}; data {a.data_dir.resolve()}; results {results}; "
            f"SuperLink {a.superlink}; compute threads {threads or os.cpu_count()}",
            flush=True,
        )
        return serve(cmds, role_env(role, thread_env(threads)), role, {f"supernode-{a.site}": port})


def _cli_env(a: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    home = cli_home(a.deploy_dir)
    return home, flower_env(home)


def _connection(a: argparse.Namespace) -> int:
    home, _ = _cli_env(a)
    ca = None if a.insecure else (a.ca or a.deploy_dir / "certs" / "ca.crt").resolve()
    if ca is not None:
        need_file(ca, "CA certificate")
    write_connection(home, a.name, a.superlink, str(ca) if ca else None)
    print(f"wrote connection {a.name!r} -> {a.superlink} into {home / 'config.toml'}")
    return 0


def _register(a: argparse.Namespace) -> int:
    _, env = _cli_env(a)
    for key in a.public_keys:
        node_id = register_node(key, a.connection, env, key.stem.replace("node", "site-"))
        print(f"registered {key} as SuperNode {node_id} on {a.connection!r}")
    return 0


def _run(a: argparse.Namespace) -> int:
    _, env = _cli_env(a)
    output = a.output_dir or a.deploy_dir / "outputs"
    try:
        run, results = checked_run(a.app or project_root(), a.connection, env, output, a.run_config, a.timeout)
    except LaunchError as err:
        print(f"\nFedBiP run FAILED: {err}", file=sys.stderr)
        return 1
    return report_run(run, results)


def _status(a: argparse.Namespace) -> int:
    _, env = _cli_env(a)
    print(status_report(a.connection, env, a.run_id))
    return 0


def _quick_try(a: argparse.Namespace) -> int:
    return quick_try(a.app or project_root(), a.deploy_dir, a.num_sites, a.per_class, a.run_config, a.timeout)


HANDLERS = {
    "make-site-data": _make_site_data,
    "shrink-data": _shrink_data,
    "superlink": _superlink,
    "site": _site,
    "connection": _connection,
    "register": _register,
    "run": _run,
    "status": _status,
    "quick-try": _quick_try,
}
