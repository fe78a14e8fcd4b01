"""The operator's status screen: the registered sites, the last runs, and a run's progress
read from its ServerApp log (phase, replies, rejected uploads, scores), all through the ``flwr``
CLI, so it works from any machine with a connection."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedbip_flower.tools.deploy.common import DeployError
from fedbip_flower.tools.deploy.flwrcli import flwr_cli, node_names, supernodes

_PHASE = re.compile(r"phase (\d)/4 (\w+)")
_REPLY = re.compile(r"(upload|evaluation) (\d+)/(\d+): (.*)")
_SCORE = re.compile(r"score of (node \d+.*?) \[(\w+)\]: (.*)")
_REJECT = re.compile(r"rejected the upload of (node \d+.*?): (.*)")
_STEPS = re.compile(r"(synthesis \d+/\d+|classifier: epoch \d+/\d+)")


def run_progress(log: str) -> list[str]:
    """What a run's ServerApp log (``flwr log --show``) says so far: the phase, replies,
    rejections, the last synthesis / classifier step, each site's score, the mean."""
    phase, step, replies, rejected, scores, final = "", "", {}, [], [], []
    for line in log.splitlines():
        if m := _PHASE.search(line):
            phase = f"phase {m.group(1)}/4: {m.group(2)}"
        if m := _REPLY.search(line):
            replies[m.group(1)] = f"{m.group(2)} of {m.group(3)} in (last: {m.group(4).strip()})"
        if m := _REJECT.search(line):
            rejected.append(f"  {m.group(1)}: {m.group(2).strip()[:160]}")
        if m := _STEPS.search(line):
            step = m.group(1)
        if m := _SCORE.search(line):
            scores.append(f"  {m.group(1):<40} {m.group(2):<9} {m.group(3).strip()}")
        if "mean accuracy over" in line or "FedBiP run failed" in line or "upload round stopped early" in line:
            final.append("  " + line.split(": ", 1)[-1].strip() if ": " in line else line.strip())
    out = [f"phase: {phase or 'not started (waiting for nodes?)'}" + (f"; last step: {step}" if step else "")]
    out += [f"{kind} replies: {text}" for kind, text in replies.items()]
    if rejected:
        out += ["rejected uploads:", *rejected]
    if scores:
        out += ["scores (accepted sites make the mean):", *scores]
    return out + final


def _seconds(value) -> str:
    try:
        return f"{float(value):.0f} s"
    except (TypeError, ValueError):
        return str(value or "")


def status_report(connection: str, env: dict[str, str], run_id: int | str | None = None) -> str:
    """One screen for the operator: the registered sites (with the names they were registered
    with), the last runs, and the chosen run's progress from its ServerApp log."""
    names = node_names(Path(env.get("FLWR_HOME", "")))
    out = [f"SuperLink connection {connection!r}", "", f"{'node id':>22}  {'site':<12} {'status':<12} since"]
    for n in supernodes(connection, env):
        since = n.get("online-at") if n.get("status") == "online" else (n.get("offline-at") or n.get("created-at"))
        out.append(
            f"{n.get('node-id', '?'):>22}  {names.get(str(n.get('node-id')), '-'):<12} {n.get('status', '?'):<12} {since or ''}"
        )
    res = flwr_cli(["ls", connection, "--format", "json"], env, timeout=60)
    try:
        runs = sorted(json.loads(res.stdout).get("runs", []), key=lambda r: int(r.get("run-id", 0)))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise DeployError(f"`flwr ls` failed: {res.stdout}{res.stderr}") from err
    out += ["", f"runs: {len(runs)}" + (" (the last 5)" if len(runs) > 5 else "")]
    out += [f"  run {r.get('run-id')}: {r.get('status')}, {_seconds(r.get('elapsed'))}" for r in runs[-5:]]
    run_id = int(run_id) if run_id else None
    chosen = next((r for r in runs if int(r.get("run-id", 0)) == run_id), None) if run_id else (runs or [None])[-1]
    if chosen is None:
        return "\n".join(out + ([f"no run {run_id}"] if run_id else []))
    rid = int(chosen["run-id"])
    logs = flwr_cli(["log", str(rid), connection, "--show"], env, timeout=120)
    out += [
        "",
        f"run {rid}: {chosen.get('status')}"
        + (f" ({chosen['status-details']})" if chosen.get("status-details") not in (None, "", "N/A") else ""),
    ]
    out += run_progress(logs.stdout)
    return "\n".join(out)
