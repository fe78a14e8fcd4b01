"""Engine-free checks of the Docker Compose deployment and its helper scripts.

No Docker engine is needed: the compose files are validated against the
Compose Specification schema with ``check-jsonschema``, their topology is read
with PyYAML, and the certificate and key scripts are run into a temporary folder.
Where Docker Compose v2 is installed, ``docker compose config`` (which needs no
daemon and pulls nothing) also renders the files merged as ``-f a -f b`` would;
those tests are skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.common.config import parse_config_args
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.helpers import flag as value_of

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
COMPOSE = DOCKER_DIR / "compose.yml"
COMPOSE_TLS = DOCKER_DIR / "compose.tls.yml"
COMPOSE_GPU = DOCKER_DIR / "compose.gpu.yml"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"
MAKE_CERTS = ROOT / "scripts" / "deploy" / "make-certs.sh"
MAKE_NODE_KEYS = ROOT / "scripts" / "deploy" / "make-node-keys.sh"

SITES = (1, 2, 3)
SUPEREXECS = ("superexec-serverapp", *(f"superexec-clientapp-{n}" for n in SITES))
NVIDIA_GPU = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def _tool(name: str, hint: str) -> str:
    """Return the path of an executable, next to the interpreter or on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found next to {sys.executable} or on PATH: {hint}")
    return found


def _check_jsonschema() -> str:
    return _tool("check-jsonschema", "install it with `pip install check-jsonschema`")


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _load(path: Path) -> dict:
    with path.open(encoding="utf-8") as file:
        return yaml.safe_load(file)


def _mounts(service: dict) -> dict[str, dict]:
    """Map target path -> long-syntax volume of a service."""
    mounts = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, dict), f"use long volume syntax, got {volume!r}"
        mounts[volume["target"]] = volume
    return mounts


def _merge_mapping(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_mapping(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merge(base: dict, override: dict) -> dict:
    """Apply a compose override the way ``docker compose -f a -f b`` does.

    Only what these files use: ``command`` is replaced, ``volumes`` are merged
    by target, mappings are merged recursively, other values are replaced.
    """
    merged = {name: dict(service) for name, service in base["services"].items()}
    for name, service in override["services"].items():
        target = merged.setdefault(name, {})
        for key, value in service.items():
            if key == "volumes":
                by_target = {v["target"]: v for v in target.get("volumes", [])}
                by_target.update({v["target"]: v for v in value})
                target["volumes"] = list(by_target.values())
            elif isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = _merge_mapping(target[key], value)
            else:
                target[key] = value
    return merged


def _gpu_devices(service: dict) -> list:
    """The device reservations of a service (empty when it reserves none)."""
    deploy = service.get("deploy") or {}
    return ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        current = ""
    assert not current, f"unfinished instruction at the end of {path}: {current!r}"
    return instructions


def _dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Defaults of the ARGs declared after FROM (the ones the build stage sees)."""
    after_from = instructions[[k for k, _ in instructions].index("FROM") + 1 :]
    return dict(a.split("=", 1) for k, a in after_from if k == "ARG" and "=" in a)


def _node_config(command: list[str]) -> dict:
    """Parse --node-config with the parser flower-supernode uses."""
    return parse_config_args([value_of(command, "--node-config")])


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def compose_tls() -> dict:
    return _load(COMPOSE_TLS)


@pytest.fixture(scope="module")
def compose_gpu() -> dict:
    return _load(COMPOSE_GPU)


# ----------------------------------------------------------------------------
# (a), (b) Compose Specification schema
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_TLS, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_file_matches_compose_spec(path: Path) -> None:
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_rejects_typo_in_key(tmp_path: Path) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    block = "\n  superlink:\n    image:"
    broken = text.replace(block, block.replace("image:", "imagez:"), 1)
    assert broken != text, "superlink service block not found"
    copy = tmp_path / "compose.yml"
    copy.write_text(broken, encoding="utf-8")

    result = _validate(copy)

    assert result.returncode != 0
    assert "imagez" in result.stdout + result.stderr


# ----------------------------------------------------------------------------
# (c) Topology
# ----------------------------------------------------------------------------
def test_services_are_the_expected_topology(compose: dict) -> None:
    expected = {"superlink", "superexec-serverapp"}
    expected |= {f"supernode-{n}" for n in SITES}
    expected |= {f"superexec-clientapp-{n}" for n in SITES}
    assert set(compose["services"]) == expected


def test_superlink_command(compose: dict) -> None:
    superlink = compose["services"]["superlink"]
    command = superlink["command"]
    assert superlink["image"].startswith("flwr/superlink:")
    assert "--insecure" in command
    assert value_of(command, "--isolation") == "process"
    assert "--disable-runtime-dependency-installation" in command
    assert value_of(command, "--host") == "0.0.0.0"
    assert value_of(command, "--port") == "8000"
    assert "8000:8000" in [str(p) for p in superlink["ports"]]


def test_serverapp_superexec(compose: dict) -> None:
    service = compose["services"]["superexec-serverapp"]
    command = service["command"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert "--insecure" in command
    assert value_of(command, "--runtime-api-address") == "superlink:8000"
    mounts = _mounts(service)
    assert "/outputs" in mounts and not mounts["/outputs"].get("read_only", False)
    assert mounts["/models"]["read_only"] is True
    assert service["environment"]["HF_HOME"] == "/models/hf-cache"


@pytest.mark.parametrize("site", SITES)
def test_site_pairs_supernode_with_clientapp_superexec(compose: dict, site: int) -> None:
    services = compose["services"]
    supernode = services[f"supernode-{site}"]
    clientapp = services[f"superexec-clientapp-{site}"]

    node_cmd = supernode["command"]
    assert supernode["image"].startswith("flwr/supernode:")
    assert "--insecure" in node_cmd
    assert value_of(node_cmd, "--superlink") == "superlink:8000"
    assert value_of(node_cmd, "--isolation") == "process"
    assert value_of(node_cmd, "--host") == "0.0.0.0"
    port = value_of(node_cmd, "--port")
    assert _node_config(node_cmd) == {
        "data-dir": "/data",
        "partition-id": site - 1,
        "num-partitions": len(SITES),
    }

    app_cmd = clientapp["command"]
    assert clientapp["build"]["dockerfile"] == "docker/Dockerfile"
    assert "--insecure" in app_cmd
    assert value_of(app_cmd, "--runtime-api-address") == f"supernode-{site}:{port}"
    assert f"supernode-{site}" in clientapp["depends_on"]

    # The ClientApp runs in the SuperExec container, so the data lives there.
    mounts = _mounts(clientapp)
    assert mounts["/data"]["read_only"] is True
    assert f"SITE{site}_DATA" in mounts["/data"]["source"]
    assert mounts["/models"]["read_only"] is True
    assert clientapp["environment"]["HF_HOME"] == "/models/hf-cache"


def test_each_site_has_a_distinct_data_volume(compose: dict) -> None:
    sources = [_mounts(compose["services"][f"superexec-clientapp-{n}"])["/data"]["source"] for n in SITES]
    assert len(set(sources)) == len(SITES)


def test_dockerfile_builds_on_superexec_image() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG FLWR_VERSION=1\.42\.0$", text, re.MULTILINE)
    assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}$", text, re.MULTILINE)
    assert re.search(r"pip install -U --no-cache-dir .* \.( |$)", text, re.MULTILINE)
    assert 'ENTRYPOINT ["flower-superexec"]' in text


# ----------------------------------------------------------------------------
# (c) CPU by default; NVIDIA GPUs through the compose.gpu.yml overlay
# ----------------------------------------------------------------------------
def test_base_file_reserves_no_gpu(compose: dict) -> None:
    """compose.yml runs on any Docker host: no device reservation, no deploy block."""
    for name, service in compose["services"].items():
        assert "deploy" not in service, f"{name} has a deploy block"
    # The image is built with the Dockerfile's default (CPU) torch.
    for name in SUPEREXECS:
        assert "TORCH_INDEX_URL" not in compose["services"][name]["build"].get("args", {})


def test_gpu_overlay_only_adds_gpus_and_the_cuda_build(compose: dict, compose_gpu: dict) -> None:
    assert set(compose_gpu) - {"services"} == {k for k in compose_gpu if k.startswith("x-")}
    assert set(compose_gpu["services"]) == set(SUPEREXECS)
    base_image = compose["services"]["superexec-serverapp"]["image"]
    for name in SUPEREXECS:
        service = compose_gpu["services"][name]
        assert set(service) == {"deploy", "build", "image"}, name
        assert _gpu_devices(service) == [NVIDIA_GPU], name
        assert set(service["deploy"]) == {"resources"}
        assert set(service["deploy"]["resources"]) == {"reservations"}
        # Only the torch build argument; context, dockerfile, FLWR_VERSION come from compose.yml.
        assert set(service["build"]) == {"args"}
        assert set(service["build"]["args"]) == {"TORCH_INDEX_URL"}
        assert re.search(r"/whl/cu\d+\}?$", service["build"]["args"]["TORCH_INDEX_URL"]), service["build"]
        # Its own tag of the same repository: the CUDA image never replaces the CPU one.
        assert service["image"].split(":")[0] == base_image.split(":")[0]
        assert service["image"] != base_image and service["image"].endswith("-gpu")


def test_gpu_overlay_merged_keeps_every_other_setting(compose: dict, compose_gpu: dict) -> None:
    merged = _merge(compose, compose_gpu)
    assert set(merged) == set(compose["services"])
    for name, service in merged.items():
        base = compose["services"][name]
        if name not in SUPEREXECS:
            assert service == base and not _gpu_devices(service)
            continue
        assert _gpu_devices(service) == [NVIDIA_GPU]
        assert service["build"]["args"]["FLWR_VERSION"] == base["build"]["args"]["FLWR_VERSION"]
        assert service["build"]["dockerfile"] == base["build"]["dockerfile"]
        rest = {k: v for k, v in service.items() if k not in ("deploy", "build", "image")}
        assert rest == {k: v for k, v in base.items() if k not in ("deploy", "build", "image")}


def test_gpu_overlay_combines_with_tls(compose: dict, compose_tls: dict, compose_gpu: dict) -> None:
    """The overlays touch disjoint keys: their order does not matter."""
    assert not any("deploy" in s or "build" in s or "image" in s for s in compose_tls["services"].values())
    tls_then_gpu = _merge({"services": _merge(compose, compose_tls)}, compose_gpu)
    gpu_then_tls = _merge({"services": _merge(compose, compose_gpu)}, compose_tls)
    assert tls_then_gpu == gpu_then_tls
    for name in SUPEREXECS:
        assert _gpu_devices(tls_then_gpu[name]) == [NVIDIA_GPU]
    command = tls_then_gpu["superexec-serverapp"]["command"]
    assert "--root-certificates" in command and "--insecure" not in command


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    instructions = _dockerfile_instructions(DOCKERFILE)
    args = _dockerfile_args(instructions)
    # CPU wheels by default; a build argument picks another build (compose.gpu.yml).
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cpu/?", args["TORCH_INDEX_URL"])

    runs = [a for k, a in instructions if k == "RUN"]
    torch_runs = [i for i, a in enumerate(runs) if '--index-url "${TORCH_INDEX_URL}"' in a]
    assert len(torch_runs) == 1, runs
    torch_run = runs[torch_runs[0]]
    assert '"torch==${TORCH_VERSION}"' in torch_run
    assert '"torchvision==${TORCHVISION_VERSION}"' in torch_run
    project_runs = [i for i, a in enumerate(runs) if re.search(r"pip install .* \.( |$)", a)]
    assert len(project_runs) == 1, runs
    assert torch_runs[0] < project_runs[0], "torch must be installed before the project"

    # The installed torch/torchvision become constraints of the project's install, so
    # pip keeps them (no second torch), and a check after it compares them again.
    constraints = re.search(r"> (\S+torch-constraints\.txt)", torch_run)
    assert constraints, torch_run
    project_run = runs[project_runs[0]]
    assert f"-c {constraints.group(1)} ." in project_run
    assert f"cmp - {constraints.group(1)}" in project_run


def test_dockerfile_torch_versions_match_each_other_and_the_project() -> None:
    args = _dockerfile_args(_dockerfile_instructions(DOCKERFILE))
    torch_v, vision_v = Version(args["TORCH_VERSION"]), Version(args["TORCHVISION_VERSION"])
    # torchvision 0.(N+15) is built against torch 2.N (e.g. 0.29 with 2.14).
    assert torch_v.major == 2 and vision_v.major == 0
    assert vision_v.minor == torch_v.minor + 15, (torch_v, vision_v)
    toml = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    with PYPROJECT.open("rb") as file:
        deps = toml.load(file)["project"]["dependencies"]
    ranges = {}
    for dep in deps:
        match = re.fullmatch(r"(torch|torchvision)\s*([<>=!~].*)", dep)
        if match:
            ranges[match.group(1)] = SpecifierSet(match.group(2))
    assert set(ranges) == {"torch", "torchvision"}, deps
    assert torch_v in ranges["torch"] and vision_v in ranges["torchvision"]


# ----------------------------------------------------------------------------
# (c) The files as Docker Compose itself merges them (skipped without Compose v2)
# ----------------------------------------------------------------------------
def _compose_command() -> list[str] | None:
    """``docker compose`` (or a standalone ``docker-compose``) of Compose v2 or newer."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        try:
            result = subprocess.run(
                [*command, "version", "--short"], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.match(r"v?(\d+)\.", result.stdout.strip())
        if result.returncode == 0 and match and int(match.group(1)) >= 2:
            return command
    return None


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory: pytest.TempPathFactory):
    """``docker compose -f ... config`` as a dict: defaults only (no .env, no variables
    of the caller's shell), nothing pulled, no daemon needed."""
    command = _compose_command()
    if command is None:
        pytest.skip("Docker Compose v2 is not installed (`docker compose version`)")
    env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    env_file.write_text("", encoding="utf-8")
    names = set()
    for path in (COMPOSE, COMPOSE_TLS, COMPOSE_GPU):
        names |= set(re.findall(r"\$\{(\w+)", path.read_text(encoding="utf-8")))
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}

    def render(*paths: Path) -> dict:
        files = [arg for path in paths for arg in ("-f", str(path))]
        result = subprocess.run(
            [*command, "--env-file", str(env_file), *files, "config", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
            cwd=DOCKER_DIR,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)["services"]

    return render


def _without_gpu(service: dict) -> dict:
    """A rendered service less what compose.gpu.yml adds."""
    service = {k: v for k, v in service.items() if k not in ("deploy", "image")}
    if "build" in service:
        args = {k: v for k, v in service["build"].get("args", {}).items() if k != "TORCH_INDEX_URL"}
        service["build"] = {**service["build"], "args": args}
    return service


def test_compose_renders_base_without_gpu(compose_config) -> None:
    services = compose_config(COMPOSE)
    for name, service in services.items():
        assert not _gpu_devices(service), name
    for name in SUPEREXECS:
        assert "TORCH_INDEX_URL" not in services[name]["build"]["args"]
        assert services[name]["image"] == "fedbip-flower-superexec:1.42.0"


def test_compose_renders_gpu_overlay(compose_config) -> None:
    base = compose_config(COMPOSE)
    gpu = compose_config(COMPOSE, COMPOSE_GPU)
    assert set(gpu) == set(base)
    for name, service in gpu.items():
        if name not in SUPEREXECS:
            assert service == base[name] and not _gpu_devices(service)
            continue
        assert _gpu_devices(service) == [NVIDIA_GPU], name
        assert service["image"] == "fedbip-flower-superexec:1.42.0-gpu"
        assert service["build"]["args"] == {
            "FLWR_VERSION": "1.42.0",
            "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu130",
        }
        assert _without_gpu(service) == _without_gpu(base[name])


@pytest.mark.parametrize("order", ["tls-gpu", "gpu-tls"])
def test_compose_renders_gpu_overlay_with_tls(compose_config, order: str) -> None:
    tls = compose_config(COMPOSE, COMPOSE_TLS)
    overlays = [COMPOSE_TLS, COMPOSE_GPU] if order == "tls-gpu" else [COMPOSE_GPU, COMPOSE_TLS]
    both = compose_config(COMPOSE, *overlays)
    assert set(both) == set(tls)
    for name, service in both.items():
        assert bool(_gpu_devices(service)) == (name in SUPEREXECS), name
        assert _without_gpu(service) == _without_gpu(tls[name]), name
    assert "--insecure" not in both["superexec-serverapp"]["command"]


# ----------------------------------------------------------------------------
# (c) TLS + SuperNode authentication override
# ----------------------------------------------------------------------------
def test_tls_superlink(compose: dict, compose_tls: dict) -> None:
    superlink = _merge(compose, compose_tls)["superlink"]
    command = superlink["command"]
    assert "--insecure" not in command
    assert "--enable-supernode-auth" in command
    assert "--disable-runtime-dependency-installation" in command
    assert value_of(command, "--isolation") == "process"
    assert value_of(command, "--host") == "0.0.0.0"
    mounts = _mounts(superlink)
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--superexec-auth-secret-file"):
        path = value_of(command, flag)
        assert path in mounts and mounts[path]["read_only"] is True


def test_tls_serverapp_superexec_trusts_the_ca(compose: dict, compose_tls: dict) -> None:
    service = _merge(compose, compose_tls)["superexec-serverapp"]
    command = service["command"]
    # The SuperLink's Runtime API shares the TLS port: no --insecure here.
    assert "--insecure" not in command
    assert value_of(command, "--runtime-api-address") == "superlink:8000"
    ca_path = value_of(command, "--root-certificates")
    assert _mounts(service)[ca_path]["source"].endswith("ca.crt")
    assert "/outputs" in _mounts(service)  # base mounts survive the override
    # The same shared secret as the SuperLink: the Runtime API is on the public port.
    link = _merge(compose, compose_tls)["superlink"]
    secret = _mounts(service)[value_of(command, "--superexec-auth-secret-file")]
    link_secret = _mounts(link)[value_of(link["command"], "--superexec-auth-secret-file")]
    assert secret["source"] == link_secret["source"] and secret["read_only"] is True


@pytest.mark.parametrize("site", SITES)
def test_tls_supernode_authenticates(compose: dict, compose_tls: dict, site: int) -> None:
    merged = _merge(compose, compose_tls)
    base_cmd = compose["services"][f"supernode-{site}"]["command"]
    command = merged[f"supernode-{site}"]["command"]
    mounts = _mounts(merged[f"supernode-{site}"])

    assert "--insecure" not in command
    assert value_of(command, "--superlink") == "superlink:8000"
    assert mounts[value_of(command, "--root-certificates")]["source"].endswith("ca.crt")
    key = mounts[value_of(command, "--auth-supernode-private-key")]
    assert key["source"].endswith(f"node{site}") and key["read_only"] is True
    # `command` is replaced, not merged: the rest must match compose.yml.
    for flag in ("--isolation", "--host", "--port", "--node-config"):
        assert value_of(command, flag) == value_of(base_cmd, flag)


def test_tls_supernodes_use_distinct_keys(compose: dict, compose_tls: dict) -> None:
    merged = _merge(compose, compose_tls)
    sources = set()
    for n in SITES:
        command = merged[f"supernode-{n}"]["command"]
        key_path = value_of(command, "--auth-supernode-private-key")
        sources.add(_mounts(merged[f"supernode-{n}"])[key_path]["source"])
    assert len(sources) == len(SITES)


def test_tls_clientapp_superexecs_stay_on_plain_runtime_api(compose: dict, compose_tls: dict) -> None:
    # SuperNodes serve their Runtime API without TLS unless given --ssl-* flags.
    merged = _merge(compose, compose_tls)
    for n in SITES:
        assert "--insecure" in merged[f"superexec-clientapp-{n}"]["command"]
        assert "--ssl-certfile" not in merged[f"supernode-{n}"]["command"]


# ----------------------------------------------------------------------------
# (d) Certificate and key scripts
# ----------------------------------------------------------------------------
def _run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _san(openssl: str, cert: Path) -> str:
    text = subprocess.run(
        [openssl, "x509", "-noout", "-text", "-in", str(cert)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    match = re.search(r"X509v3 Subject Alternative Name:.*?\n\s*(.+)", text)
    assert match, text
    return match.group(1)


def test_make_certs_default_san(tmp_path: Path) -> None:
    openssl = _tool("openssl", "install OpenSSL")
    out = tmp_path / "certs"
    result = _run_script(str(MAKE_CERTS), str(out), env={"FLWR_CERT_BITS": "2048"})
    assert result.returncode == 0, result.stdout + result.stderr

    for name in ("ca.crt", "ca.key", "server.csr", "server.pem", "server.key"):
        assert (out / name).is_file(), name
    san = _san(openssl, out / "server.pem")
    assert "IP Address:127.0.0.1" in san
    assert "DNS:localhost" in san
    assert "DNS:superlink" in san  # the name SuperNodes/SuperExec dial in compose
    verify = subprocess.run(
        [openssl, "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # Second run keeps the existing files.
    before = (out / "server.pem").read_bytes()
    again = _run_script(str(MAKE_CERTS), str(out), env={"FLWR_CERT_BITS": "2048"})
    assert again.returncode == 0, again.stderr
    assert (out / "server.pem").read_bytes() == before


def test_make_certs_custom_san(tmp_path: Path) -> None:
    openssl = _tool("openssl", "install OpenSSL")
    out = tmp_path / "certs"
    result = _run_script(
        str(MAKE_CERTS),
        str(out),
        "IP:10.1.2.3,DNS:link.example.org",
        env={"FLWR_CERT_BITS": "2048"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    san = _san(openssl, out / "server.pem")
    assert "IP Address:10.1.2.3" in san and "DNS:link.example.org" in san


def test_make_certs_usage() -> None:
    result = _run_script(str(MAKE_CERTS))
    assert result.returncode == 2
    assert "Usage:" in result.stderr


def test_make_node_keys(tmp_path: Path) -> None:
    ssh_keygen = _tool("ssh-keygen", "install OpenSSH (openssh-client)")
    out = tmp_path / "keys"
    result = _run_script(str(MAKE_NODE_KEYS), str(out), "3")
    assert result.returncode == 0, result.stdout + result.stderr

    for n in SITES:
        private, public = out / f"node{n}", out / f"node{n}.pub"
        assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        # Same parser flower-supernode uses for --auth-supernode-private-key.
        key = load_ssh_private_key(private.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP384R1)
        fingerprint = subprocess.run(
            [ssh_keygen, "-l", "-f", str(public)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        assert fingerprint.startswith("384 ") and "(ECDSA)" in fingerprint

    before = (out / "node1").read_bytes()
    again = _run_script(str(MAKE_NODE_KEYS), str(out), "3")
    assert again.returncode == 0, again.stderr
    assert (out / "node1").read_bytes() == before


def test_make_node_keys_rejects_bad_count(tmp_path: Path) -> None:
    result = _run_script(str(MAKE_NODE_KEYS), str(tmp_path), "three")
    assert result.returncode == 2
    assert "positive integer" in result.stderr
