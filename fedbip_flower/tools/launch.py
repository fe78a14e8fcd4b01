"""Run the FedBiP app with ``flwr run`` against a SuperLink this process owns, and check it.

``flwr run`` exits 0 even when the ServerApp fails, so this launcher reads the run's real
status (``flwr ls --run-id``) and exits non-zero unless it is ``finished:completed`` (exit 3:
completed, but no accepted site could score the classifier; results.json says why and where
the classifier is). It
starts its own SuperLink (simulation runtime, runtime dependency installation disabled) on
a free port with a private ``FLWR_HOME``, and always stops it.

Main job (4 clients on the bundled benchmark's held-out styles)::

    python -m fedbip_flower.tools.launch --output-dir outputs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedbip_flower.tools.supervise import Processes, stop_families

if TYPE_CHECKING:
    from fedbip_flower.config import FedBiPConfig

BIN = Path(sys.executable).parent

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """A Flower process failed to start, or the run did not complete."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"process exited with code {proc.returncode} before opening port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise LaunchError(f"nothing listens on port {port} after {timeout:.0f} s")


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        HF_DATASETS_OFFLINE=env.get("HF_DATASETS_OFFLINE", "1"),
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_connection(flwr_home: Path, name: str, address: str, root_cert: str | None = None) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_cert}"' if root_cert else "insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr_run(
    app: Path,
    connection: str,
    env: dict[str, str],
    run_config: str = "",
    federation_config: str = "",
    timeout: float = 3600,
    echo: bool = True,
) -> tuple[int, str]:
    """``flwr run --stream``; returns (run id, its output). Raises if no run started.

    Never blocks past ``timeout``: the CLI's output is read in a thread, and a CLI still
    running at the deadline is stopped (its process group, SIGTERM then SIGKILL).
    """
    args = [str(BIN / "flwr"), "run", str(app), connection, "--stream"]
    if federation_config:
        args += ["--federation-config", federation_config]
    if run_config:
        args += ["--run-config", run_config]
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    out: list[str] = []

    def _read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=_read, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:  # timed out, or this process is being interrupted
            stop_families([proc.pid], signal.SIGTERM, grace=10)
            proc.wait(timeout=10)
        reader.join(timeout=10)
    text = "".join(out)
    m = re.search(r"Successfully started run (\d+)", text)
    if not m:
        why = f"timed out after {timeout:.0f} s" if timed_out else f"exit {proc.returncode}"
        raise LaunchError(f"`flwr run` started no run ({why}):\n{text[-3000:]}")
    if timed_out:
        log.warning("`flwr run --stream` still streamed run %s after %.0f s; stopped following it", m.group(1), timeout)
    return int(m.group(1)), text


def run_status(run_id: int, connection: str, env: dict[str, str], wait: float = 120) -> dict:
    """The run's record from ``flwr ls``, waiting until it has finished.

    A slow or unreadable answer is retried until ``wait`` seconds have passed; then the last
    problem is raised as a LaunchError (the caller never gets a TimeoutExpired).
    """
    deadline = time.time() + wait
    while True:
        problem = ""
        try:
            res = subprocess.run(
                [str(BIN / "flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            data = json.loads(res.stdout)
            run = next(r for r in data.get("runs", []) if int(r.get("run-id")) == run_id)
        except subprocess.TimeoutExpired:
            problem = "`flwr ls` did not answer in 120 s"
        except (json.JSONDecodeError, StopIteration, TypeError, ValueError, AttributeError):
            problem = f"{res.stdout} {res.stderr}".strip()
        if problem:
            if time.time() > deadline:
                raise LaunchError(f"cannot read the status of run {run_id}: {problem}")
            time.sleep(2)
            continue
        if str(run.get("status", "")).startswith("finished") or time.time() > deadline:
            return run
        time.sleep(2)


def find_results(output_dir: Path, run_id: int) -> Path | None:
    hits = sorted(output_dir.glob(f"*-run{run_id}/results.json"))
    return hits[-1] if hits else None


UNSCORED_EXIT = 3  # the run completed and saved a classifier, but no accepted site could score it


def print_summary(results: dict) -> int:
    """Print the per-client table; returns the exit code the results call for (0, or
    UNSCORED_EXIT when no accepted site scored the classifier, explained on stderr)."""
    print("\nFedBiP results")
    print(f"{'node':>22}  {'domain':<12} {'status':<9} {'accuracy':>8}  {'upload':>10}")
    for c in results["clients"]:
        acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.4f}"
        domain = "".join(ch if ch.isprintable() else "?" for ch in str(c["domain"])[:40])
        print(f"{c['node_id']:>22}  {domain:<12} {c['status']:<9} {acc:>8}  {c['upload_bytes']:>8} B")
    if results.get("mean_accuracy") is not None:
        print(f"mean accuracy: {results['mean_accuracy']:.4f} (accepted sites)")
    if results.get("rejected_mean_accuracy") is not None:
        print(f"rejected sites, apart: mean accuracy {results['rejected_mean_accuracy']:.4f}")
    screened = [
        c
        for c in results["clients"]
        if (c.get("screening") or {}).get("flagged") or (c.get("screening") or {}).get("notes")
    ]
    for c in screened:
        s = c["screening"]
        checks = ", ".join(sorted({f["check"] for f in s["findings"]})) or "quota"
        print(f"screened: node {c['node_id']}: {s['action']} ({checks}); {s['used']} of {s['received']} latents used")
    used = [c for c in results["clients"] if c["status"] == "accepted" and c["accuracy"] is not None]
    kept = [c["accuracy"] for c in used if (c.get("screening") or {}).get("action") != "excluded"]
    if kept and len(kept) < len(used):
        print(f"mean accuracy without the excluded sites: {sum(kept) / len(kept):.4f}")
    print("time (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()))
    if results.get("status") == "unscored":
        print(f"\nFedBiP run UNSCORED: {results.get('error', '')}", file=sys.stderr)
        return UNSCORED_EXIT
    return 0


def simulate(
    app: Path,
    num_supernodes: int,
    run_config: str,
    output_dir: Path,
    flwr_home: Path | None = None,
    cpus_per_client: int = 1,
    timeout: float = 3600,
    echo: bool = True,
    gpus_per_client: float = 0.0,
) -> tuple[dict, dict]:
    """Run the app in simulation; returns (run record, results.json). Raises on failure."""
    tmp = None
    if flwr_home is None:
        tmp = flwr_home = Path(tempfile.mkdtemp(prefix="fedbip-flwr-"))
    output_dir = output_dir.resolve()
    env = flower_env(flwr_home)
    port = free_port()
    write_connection(flwr_home, "fedbip-sim", f"127.0.0.1:{port}")
    try:
        with Processes(env, flwr_home) as procs:
            link = procs.start(
                "superlink",
                [
                    str(BIN / "flower-superlink"),
                    "--insecure",
                    "--simulation",
                    "--disable-runtime-dependency-installation",
                    "--port",
                    str(port),
                ],
                cwd=flwr_home,
            )
            wait_for_port(port, link)
            rc = f"output-dir='{output_dir}'" + (f" {run_config}" if run_config else "")
            fed = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
            if gpus_per_client:
                fed += f" client-resources-num-gpus={gpus_per_client}"
            run_id, _ = flwr_run(app, "fedbip-sim", env, rc, fed, timeout, echo)
            run = run_status(run_id, "fedbip-sim", env)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return run, checked_results(run, run_id, output_dir)


def checked_results(run: dict, run_id: int | str, output_dir: Path) -> dict:
    """The run's results.json, with its path; raises unless the run really completed and wrote one."""
    path = find_results(output_dir, run_id)
    results = json.loads(path.read_text()) if path else {}
    if run.get("status") != "finished:completed":
        detail = run.get("status-details") or results.get("error") or ""
        raise LaunchError(f"run {run_id} ended as {run.get('status')!r}: {detail}")
    if not results:
        raise LaunchError(f"run {run_id} completed but wrote no results.json under {output_dir}")
    results["results_path"] = str(path)
    return results


def project_root() -> Path:
    for p in [Path.cwd(), *Path.cwd().parents]:
        if (p / "pyproject.toml").is_file() and (p / "server_app").is_dir():
            return p
    raise LaunchError("run this from the fedbip-flower project folder (or pass --app)")


def default_sites(cfg: FedBiPConfig) -> int:
    """The simulated federation's size when none is given: one site per style of the bundled
    benchmark's ``data.domains`` (the main job: 4), and never fewer than ``min-clients``."""
    styles = [d for d in cfg.data.domains.split(",") if d.strip()] if cfg.data.dataset == "fedbip-shapes" else []
    return max(cfg.min_clients, len(styles))


def main(argv: list[str] | None = None) -> int:
    import click
    from flwr.common.config import parse_config_args

    from fedbip_flower.config import (
        ConfigError,
        FedBiPConfig,
        experiment_names,
        load_experiment,
        run_config_string,
    )

    p = argparse.ArgumentParser(description="Run FedBiP in Flower's simulation engine and check the run.")
    p.add_argument("--app", type=Path, default=None, help="app folder (default: this project)")
    p.add_argument(
        "--experiment",
        default="",
        help=f"experiment preset: {', '.join(experiment_names())} or a TOML run-config file; --run-config overrides it",
    )
    p.add_argument(
        "--num-supernodes",
        type=int,
        default=None,
        help="simulated sites (default: one per style of data.domains for fedbip-shapes, at least min-clients)",
    )
    p.add_argument("--cpus-per-client", type=int, default=1)
    p.add_argument("--gpus-per-client", type=float, default=0.0, help="GPU share of each simulated client, e.g. 0.25")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"))
    p.add_argument("--run-config", default="", help='extra --run-config overrides, e.g. "seed=1"')
    p.add_argument("--timeout", type=float, default=3600)
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        overrides = load_experiment(a.experiment) if a.experiment else {}
        overrides.update(parse_config_args([a.run_config]) if a.run_config else {})
        cfg = FedBiPConfig.from_run_config(overrides)
    except (ConfigError, ValueError, click.ClickException) as err:
        print(f"FedBiP run NOT STARTED: {getattr(err, 'message', err)}", file=sys.stderr)
        return 2
    # An experiment's overrides go to flwr re-serialized (one string, later keys win);
    # without one, the user's string goes as it is.
    run_config = run_config_string(overrides) if a.experiment else a.run_config
    try:
        run, results = simulate(
            a.app or project_root(),
            a.num_supernodes or default_sites(cfg),
            run_config,
            a.output_dir,
            cpus_per_client=a.cpus_per_client,
            gpus_per_client=a.gpus_per_client,
            timeout=a.timeout,
        )
    except LaunchError as err:
        print(f"\nFedBiP run FAILED: {err}", file=sys.stderr)
        return 1
    code = print_summary(results)
    print(
        f"run {run.get('run-id')} {run.get('status')} in {time.time() - t0:.0f} s wall; "
        f"outputs: {Path(results['results_path']).parent}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
