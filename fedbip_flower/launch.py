"""Run the FedBiP app with ``flwr run`` against a SuperLink this process owns, and check it.

``flwr run`` exits 0 even when the ServerApp fails, so this launcher reads the run's real
status (``flwr ls --run-id``) and exits non-zero unless it is ``finished:completed``. It
starts its own SuperLink (simulation runtime, runtime dependency installation disabled) on
a free port with a private ``FLWR_HOME``, and always stops it.

Main job (4 clients on the bundled benchmark's held-out styles)::

    python -m fedbip_flower.launch --output-dir outputs
"""

from __future__ import annotations

import argparse
import contextlib
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
import time
from collections.abc import Iterator
from pathlib import Path

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
        FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        HF_DATASETS_OFFLINE=env.get("HF_DATASETS_OFFLINE", "1"), PYTHONUNBUFFERED="1",
    )  # fmt: skip
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


class Processes:
    """Owns Flower processes; every one is stopped on exit, whatever happens."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir = env, log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen(
            args, env=self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:  # stuck in the kernel: report it, stop the others
                log.warning("process %s (pid %d) survived SIGKILL for 15 s", name, proc.pid)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def write_connection(flwr_home: Path, name: str, address: str, root_cert: str | None = None) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_cert}"' if root_cert else "insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr_run(app: Path, connection: str, env: dict[str, str], run_config: str = "",
             federation_config: str = "", timeout: float = 3600, echo: bool = True) -> tuple[int, str]:  # fmt: skip
    """``flwr run --stream``; returns (run id, its output). Raises if no run started."""
    args = [str(BIN / "flwr"), "run", str(app), connection, "--stream"]
    if federation_config:
        args += ["--federation-config", federation_config]
    if run_config:
        args += ["--run-config", run_config]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    deadline = time.time() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        if time.time() > deadline:
            proc.kill()
            break
    proc.wait()
    text = "".join(out)
    m = re.search(r"Successfully started run (\d+)", text)
    if not m:
        raise LaunchError(f"`flwr run` started no run (exit {proc.returncode}):\n{text[-3000:]}")
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
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
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


def print_summary(results: dict) -> None:
    print("\nFedBiP results")
    print(f"{'node':>22}  {'domain':<12} {'status':<9} {'accuracy':>8}  {'upload':>10}")
    for c in results["clients"]:
        acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.4f}"
        print(f"{c['node_id']:>22}  {c['domain']:<12} {c['status']:<9} {acc:>8}  {c['upload_bytes']:>8} B")
    if results.get("mean_accuracy") is not None:
        print(f"mean accuracy: {results['mean_accuracy']:.4f}")
    print("time (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()))


def simulate(app: Path, num_supernodes: int, run_config: str, output_dir: Path,
             flwr_home: Path | None = None, cpus_per_client: int = 1, timeout: float = 3600,
             echo: bool = True) -> tuple[dict, dict]:  # fmt: skip
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
            link = procs.start("superlink", [
                str(BIN / "flower-superlink"), "--insecure", "--simulation",
                "--disable-runtime-dependency-installation", "--port", str(port),
            ], cwd=flwr_home)  # fmt: skip
            wait_for_port(port, link)
            rc = f"output-dir='{output_dir}'" + (f" {run_config}" if run_config else "")
            fed = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
            run_id, _ = flwr_run(app, "fedbip-sim", env, rc, fed, timeout, echo)
            run = run_status(run_id, "fedbip-sim", env)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    path = find_results(output_dir, run_id)
    results = json.loads(path.read_text()) if path else {}
    if run.get("status") != "finished:completed":
        detail = run.get("status-details") or results.get("error") or ""
        raise LaunchError(f"run {run_id} ended as {run.get('status')!r}: {detail}")
    if not results:
        raise LaunchError(f"run {run_id} completed but wrote no results.json under {output_dir}")
    results["results_path"] = str(path)
    return run, results


def project_root() -> Path:
    for p in [Path.cwd(), *Path.cwd().parents]:
        if (p / "pyproject.toml").is_file() and (p / "server_app").is_dir():
            return p
    raise LaunchError("run this from the fedbip-flower project folder (or pass --app)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run FedBiP in Flower's simulation engine and check the run.")
    p.add_argument("--app", type=Path, default=None, help="app folder (default: this project)")
    p.add_argument("--num-supernodes", type=int, default=4)
    p.add_argument("--cpus-per-client", type=int, default=1)
    p.add_argument("--output-dir", type=Path, default=Path("outputs"))
    p.add_argument("--run-config", default="", help="extra --run-config overrides, e.g. \"seed=1\"")
    p.add_argument("--timeout", type=float, default=3600)
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        run, results = simulate(a.app or project_root(), a.num_supernodes, a.run_config, a.output_dir,
                                cpus_per_client=a.cpus_per_client, timeout=a.timeout)  # fmt: skip
    except LaunchError as err:
        print(f"\nFedBiP run FAILED: {err}", file=sys.stderr)
        return 1
    print_summary(results)
    print(f"run {run.get('run-id')} {run.get('status')} in {time.time() - t0:.0f} s wall; "
          f"outputs: {Path(results['results_path']).parent}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
