"""The Dockerfiles and serve_replicas.sh, checked without Docker: the images copy every
package the project installs, and the script refuses bad input with a clear message."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.deploy.deploy_files import DEPLOY, REPO

SCRIPT = os.path.join(DEPLOY, "serve_replicas.sh")


def read(path: str) -> str:
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def ignored() -> set[str]:
    lines = read(".dockerignore").splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def test_engine_image_copies_every_installed_package():
    # tomllib is 3.11+; the one line of pyproject.toml this needs is simple enough.
    (line,) = re.findall(r"^include = \[(.*)\]$", read("pyproject.toml"), re.M)
    packages = {p.strip().strip('"').rstrip("*") for p in line.split(",")}
    assert "frontend" in packages and "engine_core" in packages
    dockerfile = read("Dockerfile")
    copied = set(re.findall(r"^COPY (\S+) \./\1$", dockerfile, re.M))
    missing = {p for p in packages if p != "router"} - copied
    assert not missing, f"Dockerfile does not COPY {missing}"
    assert not (copied & ignored()), ".dockerignore drops a package the image copies"
    assert re.search(r'^ENTRYPOINT \["python", "-m", "frontend"\]$', dockerfile, re.M)
    assert re.search(r"^ARG BASE_IMAGE=\S+$", dockerfile, re.M)
    assert re.search(r"^ARG DEVICE=cuda$", dockerfile, re.M)


def test_router_image_runs_the_router():
    dockerfile = read("deploy/docker/router.Dockerfile")
    assert re.search(r"^COPY router \./router$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["python", "-m", "router"\]$', dockerfile, re.M)
    assert "router" not in ignored()


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", SCRIPT, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PY": sys.executable, **env},
    )


def test_serve_replicas_refuses_a_bad_count():
    for n in ("0", "-1", "two", ""):
        out = run_script(n)
        assert out.returncode == 2, n
        assert "N must be a positive integer" in out.stderr, out.stderr


def test_serve_replicas_refuses_ports_past_65535():
    out = run_script("3", PORT="65534")
    assert out.returncode == 2 and "PORT must leave room" in out.stderr, out.stderr


def test_pods_run_as_the_images_user():
    from tests.deploy.deploy_files import find, render

    objs = render("gpu")
    for dockerfile, deployment in (
        ("Dockerfile", "ringserve-engine"),
        ("deploy/docker/router.Dockerfile", "ringserve-router"),
    ):
        (uid,) = re.findall(r"^USER (\d+)$", read(dockerfile), re.M)
        ctx = find(objs, "Deployment", deployment)["spec"]["template"]["spec"]["securityContext"]
        assert ctx["runAsNonRoot"] and ctx["runAsUser"] == int(uid), deployment
