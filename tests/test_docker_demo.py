"""The Docker Compose demo helper: its static parts always, the demo itself with a daemon.

The whole demo (images, compose up, one FedBiP run, checks, compose down) runs only where a
Docker daemon answers and ``FEDBIP_TEST_DOCKER=1`` is set: with the images already built it
takes about 2-4 minutes on 2 cores, and a first build needs about 12 GB of disk, so it stays
out of the default lane (``FEDBIP_TEST_DOCKER=1 bash scripts/test.sh -k docker_demo``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedbip_flower.tools import docker_demo

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "docker" / "flower-local.Dockerfile"


def test_requirements_follow_the_dockerfile_pins_and_keep_ray_out():
    reqs = docker_demo.requirements(ROOT)
    text = (ROOT / "docker" / "Dockerfile").read_text()
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M).group(1)
    vision = re.search(r"^ARG TORCHVISION_VERSION=(\S+)", text, re.M).group(1)
    assert f"torch=={torch}" in reqs and f"torchvision=={vision}" in reqs
    assert f"flwr=={docker_demo.FLWR_VERSION}" in reqs and not any(r.startswith("flwr[") for r in reqs)
    assert "hatchling" in " ".join(reqs)  # the app's build backend, for `pip install .` offline
    assert any(r.startswith("diffusers") for r in reqs)


def test_local_flower_images_mirror_flowers_layout():
    text = LOCAL.read_text()
    for role in docker_demo.FLOWER_IMAGES:
        assert re.search(rf"^FROM flower AS {role}\nENTRYPOINT \[\"flower-{role}\"\]", text, re.M), role
    assert "--uid 49999" in text and "--gid 49999" in text and "WORKDIR /app" in text and "USER app" in text
    # the app image builds on them unchanged
    assert "FROM flwr/superexec:${FLWR_VERSION}" in (ROOT / "docker" / "Dockerfile").read_text()


def test_the_wheelhouse_is_served_read_only_on_loopback(tmp_path):
    import urllib.request

    (tmp_path / "pkg-1.0-py3-none-any.whl").write_bytes(b"wheel")
    with docker_demo.serve_folder(tmp_path) as url:
        assert url.startswith("http://127.0.0.1:")
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "pkg-1.0-py3-none-any.whl" in page
        body = urllib.request.urlopen(url + "pkg-1.0-py3-none-any.whl", timeout=10).read()
        assert body == b"wheel"


def test_the_stack_gives_each_site_a_fair_share_and_its_folders(tmp_path):
    stack = docker_demo.Stack(ROOT, tmp_path, tls=True)
    assert stack.files[-1].endswith("compose.tls.yml") and stack.connection == "docker-tls"
    assert stack.env["SITE_THREADS"] == str(max(1, (os.cpu_count() or 1) // docker_demo.SITES))
    assert {stack.env[f"SITE{n}_DATA"] for n in (1, 2, 3)} == {str(tmp_path / "sites" / f"site-{n}") for n in (1, 2, 3)}
    compose = (ROOT / "docker" / "compose.yml").read_text()
    assert "OMP_NUM_THREADS: ${SITE_THREADS:-1}" in compose


def _daemon() -> str:
    if os.environ.get("FEDBIP_TEST_DOCKER") != "1":
        return "set FEDBIP_TEST_DOCKER=1 to run the Docker demo (2-4 min with images built, ~12 GB disk)"
    if shutil.which(docker_demo.DOCKER) is None:
        return "no docker CLI"
    res = subprocess.run([docker_demo.DOCKER, "info"], capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        return f"no Docker daemon answers: {res.stderr.strip()[-200:]}"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_daemon()), reason=_daemon() or "docker available")
def test_the_demo_runs_end_to_end_and_tears_down(tmp_path):
    demo = tmp_path / "demo"
    code = docker_demo.main(["--demo-dir", str(demo), "run", "--run-config", "client.steps=2 classifier.epochs=1"])
    assert code == 0
    (results,) = (demo / "outputs").glob("*/results.json")
    res = json.loads(results.read_text())
    assert res["status"] == "completed" and len(res["clients"]) == docker_demo.SITES
    assert all(c["status"] == "accepted" and 0 <= c["accuracy"] <= 1 for c in res["clients"])
    assert (results.parent / "classifier.safetensors").is_file()
    ps = subprocess.run(
        [docker_demo.DOCKER, "ps", "-q", "--filter", f"label=com.docker.compose.project={docker_demo.PROJECT}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ps.stdout.strip() == "", "containers left running after the demo"
