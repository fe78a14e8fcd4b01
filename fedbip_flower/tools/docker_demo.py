"""The Docker Compose demo, end to end: images, bring-up, one checked FedBiP run, tear-down.

``python -m fedbip_flower.tools.docker_demo run [--tls]`` (or ``scripts/docker-demo.sh``):

1. **Images.** Flower's ``flwr/superlink``, ``flwr/supernode`` and ``flwr/superexec`` at the
   pinned release are used if present, else pulled; where Docker Hub is out of reach they are
   built locally from ``docker/flower-local.Dockerfile`` (same entrypoints, user and paths as
   Flower's images) on a base the machine makes itself: a Debian root file system from
   ``debootstrap``, imported with ``docker import``. Then the app's SuperExec image
   (``docker/Dockerfile``). Python packages come from a wheelhouse that the host's own pip
   fills (``pip download``: the host's index settings and CA bundle, none of them copied into
   an image) and that this process serves on 127.0.0.1 while the builds run
   (``--network host``).
2. **Bring-up.** Three site folders from the bundled benchmark, the outputs folder, and with
   ``--tls`` the certificates, node keys and SuperExec secret; ``docker compose up`` of
   ``docker/compose.yml`` (plus ``compose.tls.yml``) unchanged, waiting until the SuperLink
   answers and three SuperNodes are online (TLS: the SuperLink first, then the node keys are
   registered, then the rest).
3. **Run.** ``flwr run . <connection> --stream`` from the host, then the run's real status
   (``flwr ls``), ``results.json`` and the classifier file in the outputs folder; the per-site
   table is printed. Exit 0 only if the run completed with scores.
4. **Tear-down.** ``docker compose down`` (volumes and orphans too), also on failure, Ctrl-C
   or SIGTERM; ``--keep`` leaves the stack up.

The demo folder (default ``docker/demo``) holds the sites, outputs, certificates, keys and the
``flwr`` CLI's FLWR_HOME; nothing else on the host changes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

from fedbip_flower.jsonio import write_json
from fedbip_flower.tools.deploy.commands import ensure_secret, fair_threads
from fedbip_flower.tools.deploy.common import DeployError
from fedbip_flower.tools.deploy.deployment import run_script
from fedbip_flower.tools.deploy.flwrcli import register_node, wait_online
from fedbip_flower.tools.deploy.sitedata import site_style, write_site
from fedbip_flower.tools.launch import (
    LaunchError,
    checked_results,
    flower_env,
    flwr_run,
    print_summary,
    project_root,
    run_status,
    wait_for_port,
    write_connection,
)

DOCKER = os.environ.get("DOCKER", "docker")
FLWR_VERSION = "1.42.0"
FLOWER_IMAGES = ("superlink", "supernode", "superexec")
BASE_IMAGE = "fedbip-local/debian:bookworm"
APP_IMAGE = f"fedbip-flower-superexec:{FLWR_VERSION}"
DEBIAN_MIRROR = os.environ.get("FEDBIP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PROJECT = "fedbip-flower"  # the compose project name (compose.yml's `name`)
SITES = 3
WHEELS_PORT = int(os.environ.get("FEDBIP_WHEELS_PORT", "18765"))
APP_UID = 49999  # the user Flower's images (and ours) run as


class DemoError(RuntimeError):
    """The demo cannot go on (Docker missing, an image that cannot be made, a failed run)."""


def say(text: str) -> None:
    print(f"[docker-demo] {text}", flush=True)


def sh(args: list[str], *, timeout: float | None = None, env: dict | None = None, quiet: bool = False):
    """Run a command; its output goes to ours unless ``quiet`` (then it is returned)."""
    if not quiet:
        say("$ " + " ".join(args))
    try:
        res = subprocess.run(
            args,
            env=env,
            timeout=timeout,
            text=True,
            capture_output=quiet,
            check=False,
        )
    except FileNotFoundError as err:
        raise DemoError(f"{args[0]} not found: install it (docs/deployment-docker.md, 'Setting up Docker')") from err
    except subprocess.TimeoutExpired as err:
        raise DemoError(f"`{' '.join(args[:3])} ...` did not finish in {timeout:.0f} s") from err
    return res


def check(res, what: str):
    if res.returncode != 0:
        tail = ((res.stdout or "") + (res.stderr or ""))[-3000:] if res.stdout is not None else ""
        raise DemoError(f"{what} failed (exit {res.returncode}){': ' + tail if tail else ''}")
    return res


def docker_ready() -> None:
    res = sh([DOCKER, "info", "--format", "{{.ServerVersion}}"], timeout=60, quiet=True)
    if res.returncode != 0:
        raise DemoError(
            "no Docker daemon answers (`docker info` failed): start dockerd, see "
            f"docs/deployment-docker.md, 'Setting up Docker'\n{res.stderr.strip()[-500:]}"
        )
    res = sh([DOCKER, "compose", "version", "--short"], timeout=60, quiet=True)
    if res.returncode != 0 or not res.stdout.strip().startswith("2"):
        raise DemoError("Docker Compose v2 is missing (`docker compose version`): see docs/deployment-docker.md")


def image_exists(ref: str) -> bool:
    return sh([DOCKER, "image", "inspect", ref], timeout=60, quiet=True).returncode == 0


# ----------------------------------------------------------------------------- images
def ensure_base_image() -> str:
    """The local Debian base (debootstrap + docker import), made once."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    if shutil.which("debootstrap") is None:
        raise DemoError("Docker Hub is out of reach and debootstrap is missing: apt-get install debootstrap")
    if os.geteuid() != 0:
        raise DemoError("making the local base image needs root (debootstrap)")
    rootfs = Path(tempfile.mkdtemp(prefix="fedbip-rootfs-"))
    try:
        say(f"making the base image {BASE_IMAGE} with debootstrap from {DEBIAN_MIRROR}")
        inc = "--include=python3,python3-venv,ca-certificates"
        args = ["debootstrap", "--variant=minbase", inc, "bookworm", str(rootfs), DEBIAN_MIRROR]
        check(sh(args, timeout=1800, quiet=True), "debootstrap")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run([DOCKER, "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True, text=True)
        tar.wait()
        check(imp, "docker import")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return BASE_IMAGE


def requirements(root: Path) -> list[str]:
    """What the images need, as the host's pip downloads it: Flower at the images' release,
    the app's dependencies (plain ``flwr``: no Ray in the images), torch and torchvision at
    ``docker/Dockerfile``'s pins, and the app's build backend."""
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    deps = [d for d in meta["project"]["dependencies"] if not d.startswith("flwr[") and not d.startswith("flwr=")]
    deps = [d for d in deps if not re.match(r"torch(vision)?\b", d)]
    dockerfile = (root / "docker" / "Dockerfile").read_text()
    pins = dict(re.findall(r"^ARG (TORCH_VERSION|TORCHVISION_VERSION)=(\S+)", dockerfile, re.M))
    backend = meta["build-system"]["requires"]
    return [
        f"flwr=={FLWR_VERSION}",
        f"torch=={pins['TORCH_VERSION']}",
        f"torchvision=={pins['TORCHVISION_VERSION']}",
    ] + [
        *deps,
        *backend,
    ]


def host_versions() -> list[str]:
    """The versions installed here (``pip freeze`` of this environment, the project itself
    left out): the images get the same ones, so they run what the tests ran."""
    res = sh([sys.executable, "-m", "pip", "list", "--format=freeze", "--exclude-editable"], timeout=300, quiet=True)
    check(res, "pip list")
    return sorted(line for line in res.stdout.splitlines() if "==" in line and not line.startswith("fedbip-flower=="))


def fill_wheelhouse(root: Path, folder: Path) -> Path:
    """``pip download`` of :func:`requirements` into ``folder`` with the host's pip (its index
    settings, find-links and CA bundle), constrained to this environment's versions
    (:func:`host_versions`, kept as ``folder/constraints.txt``); skipped when the folder
    already holds this list."""
    folder.mkdir(parents=True, exist_ok=True)
    reqs, pins = requirements(root), host_versions()
    stamp = folder / ".requirements.json"
    if stamp.exists() and json.loads(stamp.read_text()) == [reqs, pins]:
        return folder
    (folder / "constraints.txt").write_text("\n".join(pins) + "\n")
    say(f"filling the wheelhouse {folder} with the host's pip ({len(reqs)} requirements, {len(pins)} pins)")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", str(folder), "-c", str(folder / "constraints.txt")]
    check(sh([*cmd, *reqs], timeout=3600, quiet=True), "pip download (the host's pip)")
    write_json(stamp, [reqs, pins])
    return folder


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` read-only on 127.0.0.1 (a pip find-links page) while inside."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:  # a fixed port keeps the build argument, and with it Docker's layer cache, the same
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # pip's requests are not worth a line each
        pass


def build(dockerfile: Path, context: Path, tag: str, wheels: str, target: str = "", **args: str) -> float:
    """``docker build`` (BuildKit, host network so RUN steps reach the wheelhouse); seconds."""
    cmd = [DOCKER, "build", "--network", "host", "-f", str(dockerfile), "-t", tag]
    cmd += ["--target", target] if target else []
    for key, value in {"WHEELS": wheels, **args}.items():
        cmd += ["--build-arg", f"{key}={value}"]
    t0 = time.time()
    res = sh([*cmd, str(context)], timeout=3600, env={**os.environ, "DOCKER_BUILDKIT": "1"}, quiet=True)
    check(res, f"docker build {tag}")
    return time.time() - t0


def ensure_images(root: Path, wheelhouse: Path, pull_timeout: float = 120) -> dict[str, float]:
    """Flower's images (present, pulled, or built locally) and the app's SuperExec image; the
    seconds each build took."""
    times: dict[str, float] = {}
    missing = [n for n in FLOWER_IMAGES if not image_exists(f"flwr/{n}:{FLWR_VERSION}")]
    for name in list(missing):
        res = sh([DOCKER, "pull", f"flwr/{name}:{FLWR_VERSION}"], timeout=pull_timeout, quiet=True)
        if res.returncode == 0:
            missing.remove(name)
        else:
            say(f"cannot pull flwr/{name}:{FLWR_VERSION} ({(res.stderr or '').strip()[-200:]}); building it locally")
    with serve_folder(fill_wheelhouse(root, wheelhouse)) as wheels:
        if missing:
            base = ensure_base_image()
            for name in missing:
                tag = f"flwr/{name}:{FLWR_VERSION}"
                say(f"building {tag} (docker/flower-local.Dockerfile on {base})")
                times[tag] = build(
                    root / "docker" / "flower-local.Dockerfile",
                    root / "docker",
                    tag,
                    wheels,
                    target=name,
                    BASE=base,
                    FLWR_VERSION=FLWR_VERSION,
                )
        say(f"building {APP_IMAGE} (docker/Dockerfile)")
        times[APP_IMAGE] = build(root / "docker" / "Dockerfile", root, APP_IMAGE, wheels, FLWR_VERSION=FLWR_VERSION)
    return times


def image_size(ref: str) -> int:
    res = sh([DOCKER, "image", "inspect", ref, "--format", "{{.Size}}"], timeout=60, quiet=True)
    return int(res.stdout.strip() or 0) if res.returncode == 0 else 0


# ----------------------------------------------------------------------------- the stack
class Stack:
    """The compose project over ``docker/compose.yml`` (+ ``compose.tls.yml``) and the demo folder."""

    def __init__(self, root: Path, demo: Path, tls: bool):
        self.root, self.demo, self.tls = root, demo.resolve(), tls
        files = ["compose.yml"] + (["compose.tls.yml"] if tls else [])
        self.files = [str(root / "docker" / f) for f in files]
        self.connection = "docker-tls" if tls else "docker"
        self.flwr_home = self.demo / "flwr-home"
        self.cli_env = flower_env(self.flwr_home)
        self.env = {
            **os.environ,
            "FLWR_VERSION": FLWR_VERSION,
            "PROJECT_DIR": str(root),
            "MODEL_CACHE": str(self.demo / "models"),
            "OUTPUTS": str(self.demo / "outputs"),
            "CERTS_DIR": str(self.demo / "certs"),
            "KEYS_DIR": str(self.demo / "keys"),
            "SECRETS_DIR": str(self.demo / "secrets"),
            **{f"SITE{n}_DATA": str(self.demo / "sites" / f"site-{n}") for n in range(1, SITES + 1)},
            "SITE_THREADS": str(fair_threads(SITES)),  # every site on this host: a fair share each
        }

    def compose(self, *args: str, timeout: float = 600, quiet: bool = False):
        cmd = [DOCKER, "compose", "--project-directory", str(self.root / "docker")]
        for f in self.files:
            cmd += ["-f", f]
        return sh([*cmd, *args], timeout=timeout, env=self.env, quiet=quiet)

    def prepare(self) -> None:
        """Site folders, an outputs folder the containers' user can write, an (empty) model
        cache; with TLS the certificates (SAN: the compose service name and loopback), node
        keys and the SuperExec secret, readable by that user."""
        for n in range(1, SITES + 1):
            folder = self.demo / "sites" / f"site-{n}"
            if not (folder / "train" / "metadata.csv").is_file():
                write_site(folder, site_style(n))
        (self.demo / "models").mkdir(parents=True, exist_ok=True)
        out = self.demo / "outputs"
        out.mkdir(parents=True, exist_ok=True)
        _give(out, 0o777)
        if self.tls:
            if not (self.demo / "certs" / "ca.crt").is_file():
                run_script("make-certs.sh", str(self.demo / "certs"), "DNS:superlink,IP:127.0.0.1,DNS:localhost")
            if not (self.demo / "keys" / f"node{SITES}").is_file():
                run_script("make-node-keys.sh", str(self.demo / "keys"), str(SITES))
            ensure_secret(self.demo / "secrets" / "superexec.secret")
            for folder in ("certs", "keys", "secrets"):
                for f in (self.demo / folder).iterdir():
                    if f.name not in ("ca.key", "ca.srl", "server.csr"):  # what the containers read
                        _give(f, 0o644)  # the demo's own throw-away material, read by UID 49999

    def up(self, timeout: float = 300) -> None:
        if self.tls:
            check(self.compose("up", "-d", "--no-build", "superlink"), "docker compose up superlink")
            wait_for_port(8000, None, timeout)
            write_connection(self.flwr_home, self.connection, "127.0.0.1:8000", str(self.demo / "certs" / "ca.crt"))
            for n in range(1, SITES + 1):
                key = self.demo / "keys" / f"node{n}.pub"
                node = _until(lambda k=key, n=n: register_node(k, self.connection, self.cli_env, f"site-{n}"), timeout)
                say(f"registered keys/node{n}.pub as SuperNode {node}")
        check(self.compose("up", "-d", "--no-build"), "docker compose up")
        wait_for_port(8000, None, timeout)
        if not self.tls:
            write_connection(self.flwr_home, self.connection, "127.0.0.1:8000")
        online = wait_online(self.connection, self.cli_env, SITES, timeout)
        say(f"{len(online)} SuperNodes online")

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=300)


def _until(fn, timeout: float):
    """``fn()``, retried every 2 s while the SuperLink is not answering yet (its port opens
    with the container, before Flower listens)."""
    deadline = time.time() + timeout
    while True:
        try:
            return fn()
        except DeployError as err:
            if "unavailable" not in str(err).lower() or time.time() > deadline:
                raise
            time.sleep(2)


def _give(path: Path, mode: int) -> None:
    """Let the containers' user (UID 49999) use ``path``: own it when we are root, else ``mode``."""
    if os.geteuid() == 0:
        os.chown(path, APP_UID, APP_UID)
    else:
        path.chmod(mode)


def run_demo(stack: Stack, run_config: str, timeout: float) -> int:
    """One FedBiP run on the stack, checked; prints the summary; returns the exit code."""
    out = stack.demo / "outputs"
    rc = f"output-dir='/outputs' min-clients={SITES}" + (f" {run_config}" if run_config else "")
    t0 = time.time()
    run_id, _ = flwr_run(stack.root, stack.connection, stack.cli_env, rc, timeout=timeout)
    run = run_status(run_id, stack.connection, stack.cli_env)
    results = checked_results(run, run_id, out)
    classifier = out / Path(results["classifier_path"]).relative_to("/outputs")
    if not classifier.is_file():
        raise DemoError(f"run {run_id}: no classifier at {classifier}")
    code = print_summary(results)
    say(
        f"run {run_id} {run.get('status')} in {time.time() - t0:.0f} s; results {results['results_path']}; "
        f"classifier {classifier} ({classifier.stat().st_size / 2**20:.1f} MB)"
    )
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedbip_flower.tools.docker_demo",
        description="The Docker Compose demo end to end (docs/deployment-docker.md).",
    )
    p.add_argument("--demo-dir", type=Path, default=None, help="default: docker/demo")
    p.add_argument("--wheelhouse", type=Path, default=None, help="default: docker/.wheelhouse")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("images", help="make the images (pull, or build locally) and print their sizes")
    s = sub.add_parser("run", help="images, compose up, one checked FedBiP run, compose down")
    s.add_argument("--tls", action="store_true", help="TLS + SuperNode authentication (compose.tls.yml)")
    s.add_argument("--run-config", default="", help='extra overrides, e.g. "seed=1"')
    s.add_argument("--timeout", type=float, default=3600)
    s.add_argument("--keep", action="store_true", help="leave the stack up after the run")
    s = sub.add_parser("down", help="stop and remove the demo stack")
    s.add_argument("--tls", action="store_true")
    a = p.parse_args(argv)
    root = project_root()
    demo = (a.demo_dir or root / "docker" / "demo").resolve()
    wheelhouse = (a.wheelhouse or root / "docker" / ".wheelhouse").resolve()

    def _term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _term)
    # Ctrl-C (SIGINT) tears down too, even when started in the background by a shell that
    # starts background jobs with SIGINT ignored.
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.time()
    try:
        docker_ready()
        if a.cmd == "down":
            Stack(root, demo, a.tls).down()
            return 0
        times = ensure_images(root, wheelhouse)
        for ref in [*(f"flwr/{n}:{FLWR_VERSION}" for n in FLOWER_IMAGES), APP_IMAGE]:
            built = f", built in {times[ref]:.0f} s" if ref in times else ""
            say(f"image {ref}: {image_size(ref) / 1e9:.2f} GB{built}")
        if a.cmd == "images":
            return 0
        stack = Stack(root, demo, a.tls)
        stack.prepare()
        try:
            t_up = time.time()
            stack.up()
            say(f"stack up in {time.time() - t_up:.0f} s ({'TLS + SuperNode auth' if a.tls else 'insecure'})")
            code = run_demo(stack, a.run_config, a.timeout)
        finally:
            if a.keep:
                say("--keep: the stack stays up; `python -m fedbip_flower.tools.docker_demo down` stops it")
            else:
                stack.down()
        say(f"demo finished in {time.time() - t0:.0f} s (exit {code})")
        return code
    except KeyboardInterrupt:
        say("interrupted; the stack was taken down")
        return 130
    except (DemoError, DeployError, LaunchError) as err:
        print(f"[docker-demo] FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


if __name__ == "__main__":
    sys.exit(main())
