"""Running a role's processes: start them in order (each waits for its port), run a role in
the foreground until Ctrl-C or a process exits, and explain a refused start to its operator."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from fedbip_flower.tools.launch import LaunchError, wait_for_port
from fedbip_flower.tools.supervise import Processes


@contextlib.contextmanager
def start_role(
    commands: dict[str, list[str]],
    env: dict[str, str],
    role_dir: Path,
    ports: dict[str, int] | None = None,
    startup_timeout: float = 60.0,
    echo: bool = False,
) -> Iterator[Processes]:
    """Start a role's processes in order (waiting for each listed port); stop all on exit.
    Logs go to ``<role_dir>/logs/<name>.log`` (appended, rotated by size)."""
    role_dir = Path(role_dir).resolve()
    with Processes(env, role_dir / "logs", echo=echo) as procs:
        for name, argv in commands.items():
            proc = procs.start(name, argv, cwd=role_dir)
            if ports and name in ports:
                try:
                    wait_for_port(ports[name], proc, startup_timeout)
                except LaunchError as err:
                    raise LaunchError(f"{name}: {err}\n{procs.log(name)[-3000:]}{hint(procs.log(name))}") from err
        yield procs


def hint(log: str) -> str:
    """What a role's log means for its operator, when Flower's own words do not say it."""
    if "Failed to activate SuperNode" in log or "Exit Code: 305" in log:
        return (
            "\nThe SuperLink refused this site: its public key is not registered there (or was registered "
            "on another SuperLink / state.db). Send the .pub file to the SuperLink operator, who runs "
            "scripts/deploy/register-nodes.sh with it (docs/deployment.md, step 5); then start the site again."
        )
    if "Address already in use" in log:
        return "\nAnother process on this machine uses the port: pass --port."
    return ""


def serve(
    commands: dict[str, list[str]], env: dict[str, str], role_dir: Path, ports: dict[str, int] | None = None
) -> int:
    """Run a role in the foreground until Ctrl-C / SIGTERM or until one process exits; its
    processes' output is echoed with a ``[name]`` prefix and kept in its log files."""

    def _term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    code = 0
    try:
        with start_role(commands, env, role_dir, ports, echo=True) as procs:
            print(f"running: {', '.join(procs.procs)} (logs in {procs.log_dir}); Ctrl-C stops them", flush=True)
            while True:
                dead = [(n, p.returncode) for n, p in procs.procs.items() if p.poll() is not None]
                if dead:
                    time.sleep(0.5)  # the processes' last words
                    name, code = dead[0]
                    print(f"{name} exited with code {code}; stopping the others", file=sys.stderr, flush=True)
                    why = hint(procs.log(name))
                    if why:
                        print(why.strip(), file=sys.stderr, flush=True)
                    code = code or 1
                    break
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, old)
    return code
