"""The commands the README and docs/ print run as printed: every ``flwr`` command's subcommand
and flags exist in the installed Flower CLI, its SuperLink connection is one the docs define,
its ``--run-config`` keys exist in the app's config; every ``python -m fedbip_flower.tools.*``,
``python -m fedbip_flower.research.*`` and ``scripts/main.sh`` command's flags exist in that
tool's ``--help``."""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLWR = str(Path(sys.executable).parent / "flwr")


def _blocks(text: str) -> list[str]:
    """The lines of the page's shell code blocks (```bash / ```sh), continuation lines joined
    and trailing comments dropped."""
    blocks, current, lang = [], None, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current, lang = [], line.strip()[3:].strip()
            else:
                if lang in ("bash", "sh"):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    out = []
    for block in blocks:
        for ln in re.sub(r"\\\n\s*", " ", block).splitlines():
            ln = re.split(r"\s#\s", ln, maxsplit=1)[0].strip()
            if ln:
                out.append(ln)
    return out


def _commands(prefix: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for ln in _blocks(page.read_text()):
            if ln.startswith(prefix):
                found.append((page.name, ln))
    return found


@functools.cache
def _help(*args: str) -> str:
    res = subprocess.run([*args, "--help"], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    assert res.returncode == 0, f"`{' '.join(args)} --help` failed: {res.stderr[-500:]}"
    return re.sub(r"\s+", " ", res.stdout)


FLOWER_DEFAULT = "local"  # `[superlink] default = "local"` in the config.toml flwr writes on first use


def _connections() -> set[str]:
    from fedbip_flower.tools.deploy.common import DEFAULT_CONNECTION

    names = {DEFAULT_CONNECTION, "fedbip-quick-try", FLOWER_DEFAULT}
    for page in PAGES:
        names |= set(re.findall(r"^\[superlink\.([\w-]+)\]", page.read_text(), re.M))
    return names


def _app_keys() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


FLWR_COMMANDS = _commands("flwr ")


def test_the_docs_print_flwr_commands():
    assert len(FLWR_COMMANDS) >= 10


@pytest.mark.parametrize("page,line", FLWR_COMMANDS, ids=[f"{p}:{ln[:60]}" for p, ln in FLWR_COMMANDS])
def test_flwr_commands_exist_with_their_flags_and_connections(page, line):
    from flwr.common.config import parse_config_args

    argv = shlex.split(line.replace("<id>", "1").replace("<node-id>", "1"))[1:]
    sub = argv[:2] if argv[0] == "supernode" else argv[:1]
    text = _help(FLWR, *sub)
    flags = [a.split("=")[0] for a in argv if a.startswith("--")]
    for flag in flags:
        assert flag in text, f"{page}: `flwr {' '.join(sub)}` has no {flag}"
    positional = [a for a in argv[len(sub) :] if not a.startswith("--")]
    # drop the values of flags that take one
    values = {
        argv[i + 1]
        for i, a in enumerate(argv[:-1])
        if a in ("--run-config", "--format", "--name", "--run-id", "--federation-config")
    }
    positional = [a for a in positional if a not in values]
    at = {"run": 1, "ls": 0, "log": 1}.get(sub[0])  # where the connection stands among the positionals
    if sub == ["supernode", "register"]:
        at = 1
    elif sub == ["supernode", "ls"]:
        at = 0
    if at is not None:
        # none given: Flower's default connection, which the CLI creates itself
        name = positional[at] if len(positional) > at else FLOWER_DEFAULT
        assert name in _connections(), f"{page}: connection of `{line}` is defined nowhere"
    if "--run-config" in argv:
        keys = set(parse_config_args([argv[argv.index("--run-config") + 1]]))
        assert keys <= _app_keys(), f"{page}: unknown run-config keys {sorted(keys - _app_keys())}"


TOOL_COMMANDS = (
    _commands("python -m fedbip_flower.tools.")
    + _commands("python -m fedbip_flower.research.")
    + _commands("bash scripts/main.sh")
)


_HELP_PROBE = """
import contextlib, io, json, re, runpy, sys
def help_of(module, args):
    buf = io.StringIO()
    sys.argv = [module, *args, "--help"]
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            if exit.code not in (0, None):
                raise
    return buf.getvalue()
out = {}
for module in json.loads(sys.stdin.read()):
    out[module] = {"": help_of(module, [])}
    subs = re.search(r"\\{([\\w,-]+)\\}", out[module][""])
    for sub in subs.group(1).split(",") if subs else []:
        out[module][sub] = help_of(module, [sub])
print(json.dumps(out))
"""


@functools.cache
def _tool_helps() -> dict[str, dict[str, str]]:
    """Each documented tool's ``--help`` and its subcommands', as ``python -m`` prints them, from
    one process (one import of torch instead of one per command)."""
    modules = sorted({_tool(line)[0] for _, line in TOOL_COMMANDS})
    res = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE],
        input=json.dumps(modules),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return {m: {k: re.sub(r"\s+", " ", v) for k, v in helps.items()} for m, helps in json.loads(res.stdout).items()}


def _tool(line: str) -> tuple[str, list[str]]:
    argv = shlex.split(line)
    if argv[0] == "bash":  # scripts/main.sh passes its arguments to the launcher
        return "fedbip_flower.tools.launch", argv[2:]
    return argv[2], argv[3:]


@pytest.mark.parametrize("page,line", TOOL_COMMANDS, ids=[f"{p}:{ln[:60]}" for p, ln in TOOL_COMMANDS])
def test_tool_commands_have_their_flags(page, line):
    module, rest = _tool(line)
    helps = _tool_helps()[module]
    text = helps[rest[0]] if rest and rest[0] in helps else helps[""]
    for flag in (a.split("=")[0] for a in rest if a.startswith("--")):
        assert flag in text, f"{page}: `{line[:80]}` has no {flag}"


def test_the_help_probe_sees_what_python_m_prints():
    """The one-process probe gives the same help as ``python -m`` for a tool with subcommands."""
    res = subprocess.run(
        [sys.executable, "-m", "fedbip_flower.tools.deploy", "status", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    assert _tool_helps()["fedbip_flower.tools.deploy"]["status"] == re.sub(r"\s+", " ", res.stdout)
