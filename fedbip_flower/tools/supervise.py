"""Process supervision shared by the launcher and the deployment helpers (on psutil).

:class:`Processes` owns the Flower processes a tool starts (SuperLink, SuperNodes,
SuperExecs): each in a session (process group) of its own, its output appended to a
size-rotated log file (:class:`LogPump`: never truncated, ``<name>.log``, ``<name>.log.1``, ...),
and every one of them, with its group and all its descendants, stopped on exit whatever
happens: SIGTERM, then SIGKILL after a grace period. Flower detaches some children into
sessions of their own (a SuperExec's ServerApp / ClientApp processes), so descendants are
found by parentage (psutil), not by group. A reaper process (``python -m
fedbip_flower.tools.supervise --reap``, in a session of its own) holds the other end of a
pipe: if the owner dies without cleaning up, even by SIGKILL, the pipe closes and the reaper
stops everything still registered.

:class:`RoleLock` keeps a role (the SuperLink, site N) from being started twice on one
deployment folder: the second start is refused before it touches any file of the first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

LOG_MAX_BYTES = int(float(os.environ.get("FEDBIP_LOG_MAX_MB", "20")) * 2**20)  # per file, then rotate
LOG_BACKUPS = int(os.environ.get("FEDBIP_LOG_BACKUPS", "5"))  # <name>.log.1 .. .5 kept


class RoleBusy(RuntimeError):
    """The role is already running from this deployment folder."""


# ----------------------------------------------------------------------------- processes
def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def is_alive(pid: int) -> bool:
    """``pid`` runs (a zombie has exited: its parent has not reaped it yet)."""
    p = _proc(pid)
    try:
        return p is not None and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start_time(pid: int) -> str:
    """A process's creation time ("" if gone): with the pid it names one process, even after
    the pid is reused."""
    p = _proc(pid)
    try:
        return f"{p.create_time():.3f}" if p is not None else ""
    except psutil.Error:
        return ""


def family(pid: int) -> list[psutil.Process]:
    """``pid`` (if it runs) and all its live descendants, whatever their session."""
    p = _proc(pid)
    if p is None:
        return []
    try:
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return [p]


def stop_families(pids: Iterable[int], sig: int = signal.SIGTERM, grace: float = 15.0) -> list[psutil.Process]:
    """Stop each pid, its process group and its descendants: ``sig`` to all at once, SIGKILL
    to whatever still runs after ``grace`` seconds (the group too: it may hold stragglers).
    Never raises; returns the processes that survived SIGKILL (stuck in the kernel)."""
    pids = list(pids)
    procs = {p.pid: p for pid in pids for p in family(pid)}

    def send(s: int) -> None:
        # Exactly one signal per process: a second SIGTERM can turn a graceful stop into a
        # forced one (a SuperNode would skip telling the SuperLink it leaves).
        groups = set()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, s)
                groups.add(pid)
        for p in procs.values():
            try:
                in_group = os.getpgid(p.pid) in groups
            except (ProcessLookupError, PermissionError):
                continue
            if not in_group:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(s)

    def wait(seconds: float) -> list[psutil.Process]:
        # Not psutil.wait_procs: it would reap the caller's own children, whose Popen objects
        # then read exit code 0. A zombie counts as stopped; its parent reaps it.
        deadline = time.time() + seconds
        while True:
            alive = [p for p in procs.values() if is_alive(p.pid)]
            if not alive or time.time() >= deadline:
                return alive
            time.sleep(0.1)

    send(sig)
    wait(grace if sig != signal.SIGKILL else 0)
    procs.update({p.pid: p for pid in pids for p in family(pid)})  # started during the grace
    send(signal.SIGKILL)
    return wait(15)


# ----------------------------------------------------------------------------- logs
class LogPump(threading.Thread):
    """Copies a process's output, line by line, to ``path`` (appended; rotated at
    :data:`LOG_MAX_BYTES` into ``path.1`` .. ``path.N``; never truncated) and, if given, to
    ``echo(line)``. Ends when every writer has closed the pipe."""

    def __init__(self, stream, path: Path, echo: Callable[[str], None] | None = None):
        super().__init__(daemon=True, name=f"log-{path.name}")
        self.stream, self.echo = stream, echo
        self.handler = logging.handlers.RotatingFileHandler(
            path, mode="a", maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8", errors="replace"
        )
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, line: str) -> None:
        self.handler.emit(logging.makeLogRecord({"msg": line.rstrip("\n"), "levelno": logging.INFO}))
        if self.echo is not None:
            self.echo(line.rstrip("\n"))

    def run(self) -> None:
        try:
            for line in self.stream:
                self.write(line)
        except (OSError, ValueError):
            pass
        finally:
            self.handler.close()


def read_log(path: Path) -> str:
    """A log with its rotated parts, oldest first."""
    parts = [Path(f"{path}.{i}") for i in range(LOG_BACKUPS, 0, -1)] + [Path(path)]
    return "".join(p.read_text(errors="replace") for p in parts if p.exists())


# ----------------------------------------------------------------------------- owner
class Processes:
    """Owns Flower processes; every one is stopped on exit, whatever happens (module doc)."""

    def __init__(self, env: dict[str, str], log_dir: Path, echo: bool = False):
        """``echo``: also print each output line to stdout as ``[name] line``."""
        self.env, self.log_dir, self.echo = env, Path(log_dir), echo
        self.procs: dict[str, subprocess.Popen] = {}
        self.pumps: dict[str, LogPump] = {}
        self.reaper: subprocess.Popen | None = None

    def _tell_reaper(self, line: str) -> None:
        if self.reaper is None or self.reaper.poll() is not None:
            self.reaper = subprocess.Popen(
                [sys.executable, "-m", "fedbip_flower.tools.supervise", "--reap"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
                close_fds=True,
            )
        with contextlib.suppress(OSError, ValueError):
            assert self.reaper.stdin is not None
            self.reaper.stdin.write(line + "\n")
            self.reaper.stdin.flush()

    def start(self, name: str, args: list[str], cwd: Path | None = None) -> subprocess.Popen:
        """Start ``args`` in a session of its own; its output goes to ``<log_dir>/<name>.log``
        (appended after a header line naming the start)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            args,
            env=self.env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.procs[name] = proc
        self._tell_reaper(f"+ {proc.pid} {start_time(proc.pid)}")
        echo = (lambda line: print(f"[{name}] {line}", flush=True)) if self.echo else None
        pump = LogPump(proc.stdout, self.log_dir / f"{name}.log", echo)
        stamp = dt.datetime.now().isoformat(sep=" ", timespec="seconds")
        pump.write(f"===== {stamp} started (pid {proc.pid}): {' '.join(args)}")
        pump.start()
        self.pumps[name] = pump
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        """Stop ``name``, its group and its descendants: ``sig``, then SIGKILL after ``grace`` s."""
        self.stop_all(sig, grace, names=[name])

    def stop_all(self, sig: int = signal.SIGTERM, grace: float = 15.0, names: Iterable[str] | None = None) -> None:
        """Stop ``names`` (default: all) at once, as :meth:`stop` does; never raises."""
        chosen = {n: self.procs[n] for n in (names if names is not None else list(self.procs)) if n in self.procs}
        for p in stop_families([p.pid for p in chosen.values()], sig, grace):
            log.warning("process %s survived SIGKILL for 15 s", p.pid)
        for name, proc in chosen.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            pump = self.pumps.get(name)
            if pump is not None:
                pump.join(timeout=5)
            self._tell_reaper(f"- {proc.pid}")

    def log(self, name: str) -> str:
        return read_log(self.log_dir / f"{name}.log")

    def close_reaper(self) -> None:
        """Let the reaper go (after a clean stop it finds nothing left to stop)."""
        if self.reaper is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert self.reaper.stdin is not None
            self.reaper.stdin.close()
        try:
            self.reaper.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.reaper.kill()
            self.reaper.wait(timeout=5)
        self.reaper = None

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop_all()
        finally:
            self.close_reaper()


def reap(stream, grace: float = 5.0) -> None:
    """The reaper's loop: read ``+ pid start`` / ``- pid`` lines until end of input (its owner
    exited, normally or by SIGKILL), then stop every registered process that still runs,
    with its group and descendants."""
    groups: dict[int, str] = {}
    for line in stream:
        parts = line.split()
        with contextlib.suppress(ValueError, IndexError):
            if parts[0] == "+":
                groups[int(parts[1])] = parts[2] if len(parts) > 2 else ""
            elif parts[0] == "-":
                groups.pop(int(parts[1]), None)
    stop_families([p for p, st in groups.items() if start_time(p) == st], signal.SIGTERM, grace)


# ----------------------------------------------------------------------------- role lock
class RoleLock:
    """An exclusive lock on ``<role_dir>/role.lock`` for as long as the role runs.

    The lock is the kernel's (``flock``): it goes with the process that holds it, even on
    SIGKILL, so a crashed role never blocks the next start. The file names the holder's pid.
    """

    def __init__(self, role_dir: Path, what: str):
        self.path, self.what, self.fd = Path(role_dir) / "role.lock", what, -1

    def __enter__(self) -> RoleLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RoleBusy(
                f"{self.what} is already running from {self.path.parent} (pid {holder}); "
                f"stop it first (Ctrl-C in its terminal, or kill {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1


if __name__ == "__main__":
    if sys.argv[1:] == ["--reap"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        reap(sys.stdin)
        sys.exit(0)
    sys.exit("usage: python -m fedbip_flower.tools.supervise --reap (started by Processes)")
