"""deploy/ manifests against the KubeRay v1.7 CRD schemas (openAPIV3Schema, JSON Schema).

The CRDs' CEL rules (x-kubernetes-validations) are not evaluated: jsonschema ignores
unknown keywords, so only structure, types, enums and required fields are checked.
"""
from __future__ import annotations

import functools
import pathlib
import shlex

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra")

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
DEPLOY = ROOT / "deploy"

pytestmark = pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found at {CRDS}")


@functools.lru_cache(maxsize=None)
def _schema(crd_file: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # the CRDs are 40k lines
    crd = yaml.load((CRDS / crd_file).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _errors(manifest: dict, crd_file: str) -> list[str]:
    validator = jsonschema.Draft7Validator(_schema(crd_file))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(manifest)]


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_rayjob_matches_the_crd_and_has_the_required_job_settings():
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert _errors(job, "ray.io_rayjobs.yaml") == []
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    # The cluster (16 GPUs) goes soon after the job; one retry for a lost head pod.
    assert 0 < spec["ttlSecondsAfterFinished"] <= 600 and spec["backoffLimit"] == 1
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    assert "env_vars" in yaml.safe_load(spec["runtimeEnvYAML"])
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu")
            for group in workers for c in group["template"]["spec"]["containers"]]
    assert all(int(g) >= 1 for g in gpus), gpus


def test_rayjob_entrypoint_runs_the_driver_on_a_valid_config():
    from orchestrator.config import load_config

    argv = shlex.split(_load("rayjob.yaml")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "orchestrator.driver"]
    run = load_config(ROOT / argv[3])
    assert run.schema.cluster.use_gpu
    workers = _load("rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                   ["nvidia.com/gpu"]) for g in workers)
    assert run.world_sizes == (gpus,)   # one Ray Train worker per GPU


def test_raycluster_matches_the_crd():
    cluster = _load("raycluster.yaml")
    assert cluster["kind"] == "RayCluster"
    assert _errors(cluster, "ray.io_rayclusters.yaml") == []


def test_the_validator_catches_schema_violations():
    job = _load("rayjob.yaml")
    job["spec"]["backoffLimit"] = "two"
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName")
    errors = _errors(job, "ray.io_rayjobs.yaml")
    assert any("backoffLimit" in e for e in errors), errors
    assert any("groupName" in e for e in errors), errors


def test_dockerfile_uses_a_cuda_base_and_installs_the_gpu_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    base = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert base and "nvidia/cuda" in base[0]
    assert 'pip install --no-build-isolation ".[gpu]"' in text


def test_rayjob_runs_on_80_gb_h100s_and_its_config_fits_them():
    from engine.planner.devices import DEVICES
    from orchestrator.config import load_config
    from orchestrator.memory_report import check_fits, estimate

    job = _load("rayjob.yaml")
    run = load_config(ROOT / shlex.split(job["spec"]["entrypoint"])[3])
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert run.schema.cluster.gpu == "h100" and DEVICES["h100"].memory_bytes == 80 * 10**9
    check_fits(run)   # raises ConfigError when a rank role exceeds 80 GB
    assert max(r.total for r in estimate(run, run.world_sizes[0]).ranks) < 80 * 10**9


def test_the_image_pins_the_ray_version_the_manifests_declare():
    import re
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    pinned = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    declared = {_load(name)["spec"].get("rayVersion") or _load(name)["spec"]["rayClusterSpec"]["rayVersion"]
                for name in ("rayjob.yaml", "raycluster.yaml")}
    assert declared == {pinned}
    assert 'ray[default,train]==${RAY_VERSION}' in dockerfile and "torch==${TORCH_VERSION}" in dockerfile


def test_the_worker_pods_outlast_the_preemption_save():
    # SIGTERM -> every rank saves within checkpoint.preempt_grace_s; the pod must not be
    # SIGKILLed first (Kubernetes' default grace is 30 s).
    from orchestrator.config import load_config

    grace = load_config(str(ROOT / "configs" / "mixtral-8x7b-16gpu.yaml")).schema.checkpoint.preempt_grace_s
    groups = (_load("rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
              + _load("raycluster.yaml")["spec"]["workerGroupSpecs"])
    assert all(g["template"]["spec"]["terminationGracePeriodSeconds"] > grace for g in groups)
