"""Everything about the production cluster definitions that can be checked without Kubernetes or
AWS: every manifest parses and has the structure its kind needs, entrypoints name job modules that
exist and accept the flags used (their --help runs), images and Ray/Python versions match the
project's pins, schedules are valid cron expressions, S3 access is by role, and no secrets."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
K8S_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))
LAUNCHER_FILES = sorted((CLUSTER / "aws").glob("*.yaml"))


# ---------------------------------------------------------------- pins


def pinned(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(rf"^{re.escape(name)}==([^\s;#]+)", line.strip(), re.I)
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in constraints.txt")


RAY = pinned("ray")


def python_tag() -> str:
    """py311 for requires-python >=3.11 (the version the project pins its wheels for)."""
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'requires-python\s*=\s*">=\s*3\.(\d+)', text)
    assert m, "pyproject.toml has no requires-python"
    return f"py3{m.group(1)}"


def test_pins_agree():
    assert re.search(rf'"ray\[[^\]]*\]=={re.escape(RAY)}"', (REPO / "pyproject.toml").read_text())
    assert RAY == "2.60.0" and python_tag() == "py311"


# ---------------------------------------------------------------- cron


_CRON_FIELDS = [(0, 59, {}), (0, 23, {}), (1, 31, {}),
                (1, 12, {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}),
                (0, 7, {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())})]


def valid_cron(expr: str) -> bool:
    """A standard 5-field cron expression (minute hour day-of-month month day-of-week), as
    Kubernetes CronJob and KubeRay's RayCronJob (robfig/cron ParseStandard) accept them."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for text, (lo, hi, names) in zip(fields, _CRON_FIELDS):
        for part in text.split(","):
            rng, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return False
            if rng in ("*", "?"):
                continue
            ends = rng.split("-")
            if len(ends) > 2:
                return False
            vals = []
            for e in ends:
                v = names.get(e.upper()) if not e.isdigit() else int(e)
                if v is None or not lo <= v <= hi:
                    return False
                vals.append(v)
            if len(vals) == 2 and vals[0] > vals[1]:
                return False
    return True


@pytest.mark.parametrize(
    "expr", ["30 1 * * *", "*/15 * * * *", "0 0 1,15 * MON-FRI", "5 4 * JAN-MAR 0", "0 22 * * 1-5/2"]
)
def test_cron_validator_accepts(expr):
    assert valid_cron(expr)


@pytest.mark.parametrize("expr", ["", "30 1 * *", "30 1 * * * *", "60 1 * * *", "0 24 * * *", "0 0 0 * *",
                                  "0 0 * 13 *", "0 0 * * 8", "*/0 * * * *", "5-1 * * * *", "@daily", "a b c d e"])
def test_cron_validator_rejects(expr):
    assert not valid_cron(expr)


# ---------------------------------------------------------------- loading


def k8s_docs() -> list[tuple[str, dict]]:
    """(file name, document) for every Kubernetes object, plus the RayJob templates embedded in
    ConfigMaps (rendered with a date, as the CronJob's pod does)."""
    out = []
    for f in K8S_FILES:
        for doc in yaml.safe_load_all(f.read_text()):
            assert isinstance(doc, dict), f"{f.name}: a YAML document that is not a mapping"
            out.append((f.name, doc))
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        rendered = (text.replace("__DATE__", "2026-11-20").replace("__DAY__", "20261120")
                                    .replace("__JOB_NAME__", "emotion-label-nightly-1").replace("__JOB_UID__", "u-1"))
                        out.append((f"{f.name}:{key}", yaml.safe_load(rendered)))
    return out


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for name, doc in k8s_docs():
        spec = doc.get("spec") or {}
        if doc["kind"] == "RayCluster":
            specs.append((name, spec))
        elif doc["kind"] == "RayJob":
            specs.append((name, spec["rayClusterSpec"]))
        elif doc["kind"] == "RayCronJob":
            specs.append((name, spec["jobTemplate"]["rayClusterSpec"]))
    return specs


def rayjob_specs() -> list[tuple[str, dict]]:
    out = []
    for name, doc in k8s_docs():
        if doc["kind"] == "RayJob":
            out.append((name, doc["spec"]))
        elif doc["kind"] == "RayCronJob":
            out.append((name, doc["spec"]["jobTemplate"]))
    return out


def pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def test_manifests_exist_and_parse():
    kinds = {doc["kind"] for _, doc in k8s_docs()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    assert LAUNCHER_FILES


DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
API_VERSIONS = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayCronJob": "ray.io/v1", "CronJob": "batch/v1",
                "ServiceAccount": "v1", "ConfigMap": "v1", "Role": "rbac.authorization.k8s.io/v1",
                "RoleBinding": "rbac.authorization.k8s.io/v1"}


@pytest.mark.parametrize("name,doc", k8s_docs(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_k8s_object_basics(name, doc):
    assert doc.get("kind") in API_VERSIONS, f"{name}: unexpected kind {doc.get('kind')}"
    assert doc.get("apiVersion") == API_VERSIONS[doc["kind"]], name
    meta = doc.get("metadata") or {}
    assert DNS_1123.match(meta.get("name", "")) and len(meta["name"]) <= 63, f"{name}: bad metadata.name"
    if doc["kind"] not in ("ServiceAccount", "ConfigMap", "Role", "RoleBinding"):
        assert isinstance(doc.get("spec"), dict), f"{name}: no spec"


def test_ray_cluster_specs():
    specs = ray_cluster_specs()
    assert len(specs) >= 4  # RayCluster, training RayJob, RayCronJob, fallback RayJob template
    for name, spec in specs:
        assert spec["rayVersion"] == RAY, f"{name}: rayVersion {spec.get('rayVersion')} != pinned {RAY}"
        assert spec.get("enableInTreeAutoscaling") is True, f"{name}: autoscaling off"
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict)
        assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"
        head_limits = head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        assert "nvidia.com/gpu" not in head_limits, f"{name}: the head is CPU-only"
        groups = spec.get("workerGroupSpecs") or []
        assert groups, f"{name}: no worker groups"
        for g in groups:
            assert DNS_1123.match(g["groupName"]), g["groupName"]
            lo, hi, n = g["minReplicas"], g["maxReplicas"], g.get("replicas", g["minReplicas"])
            assert 0 <= lo <= n <= hi, f"{name}/{g['groupName']}: replicas {lo} <= {n} <= {hi} violated"
            assert isinstance(g["rayStartParams"], dict)
            for c in g["template"]["spec"]["containers"]:
                res = c.get("resources", {})
                gpus = res.get("limits", {}).get("nvidia.com/gpu")
                if gpus is not None:  # GPUs must be requested = limited, integers
                    assert str(gpus).isdigit() and res.get("requests", {}).get("nvidia.com/gpu") == gpus
        assert head["template"]["spec"].get("serviceAccountName") == "emotion-ray", f"{name}: head account"
        for g in groups:  # workers: S3 via IRSA, but not the autoscaler rights KubeRay binds to the head's account
            assert g["template"]["spec"].get("serviceAccountName") == "emotion-ray-worker", f"{name}/{g['groupName']}"
    by_name = dict(specs)
    gpu_groups = [g for g in by_name["raycluster.yaml"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups and gpu_groups[0]["maxReplicas"] > gpu_groups[0]["minReplicas"]
    assert by_name["raycluster.yaml"]["authOptions"] == {"mode": "token"}
    assert by_name["raycluster.yaml"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjobs():
    jobs = rayjob_specs()
    modules = {entrypoint_module(spec["entrypoint"])[0] for _, spec in jobs}
    assert modules == {"jobs.train", "jobs.label"}
    for name, spec in jobs:
        assert cluster_deleted_within(spec) <= 600, f"{name}: the Ray cluster must go away minutes after the job"
        assert spec.get("activeDeadlineSeconds", 0) > 0, f"{name}: a hung job must end"
        renv = yaml.safe_load(spec.get("runtimeEnvYAML", "{}")) or {}
        assert "pip" not in renv and "uv" not in renv, f"{name}: dependencies come from the image"
        assert not SECRET_NAMES.search(" ".join((renv.get("env_vars") or {}).keys()))


def cluster_deleted_within(spec: dict) -> float:
    """Seconds after the job ends until KubeRay deletes its Ray cluster (inf if never), for both
    ways to say it: shutdownAfterJobFinishes + ttlSecondsAfterFinished, or deletionRules."""
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules")
    if rules:
        assert "shutdownAfterJobFinishes" not in spec, "KubeRay refuses deletionRules with shutdownAfterJobFinishes"
        ends = [{"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}]
        ttls = []
        for end in ends:
            match = [r["condition"].get("ttlSeconds", 0) for r in rules if r["policy"] == "DeleteCluster"
                     and all(r["condition"].get(k) == v for k, v in end.items())]
            ttls.append(min(match) if match else float("inf"))
        return max(ttls)
    if spec.get("shutdownAfterJobFinishes") is True:
        return spec.get("ttlSecondsAfterFinished", 0)
    return float("inf")


def test_nightly_clusters_go_away_scale_to_zero_and_keep_a_bounded_history():
    """Issue: the nightly cluster idled 24 h after each run (ttlSecondsAfterFinished delays the
    *cluster's* deletion) with a worker pinned by minReplicas: 1, and RayJobs piled up forever."""
    docs = k8s_docs()
    cron = next(doc for _, doc in docs if doc["kind"] == "RayCronJob")
    template = cron["spec"]["jobTemplate"]
    rules = template["deletionStrategy"]["deletionRules"]
    for status in ("SUCCEEDED", "FAILED"):
        self_ttl = [r["condition"]["ttlSeconds"] for r in rules
                    if r["policy"] == "DeleteSelf" and r["condition"].get("jobStatus") == status]
        assert self_ttl and 0 < self_ttl[0] <= 30 * 86400, f"RayJob history not bounded for {status}"
    # the fallback: each RayJob is owned by the CronJob's Job, whose history is limited
    fallback = next(doc for name, doc in docs if name.endswith(":rayjob.yaml"))
    owner = fallback["metadata"]["ownerReferences"][0]
    assert (owner["apiVersion"], owner["kind"]) == ("batch/v1", "Job")
    cronjob = next(doc for _, doc in docs if doc["kind"] == "CronJob")
    assert (
        0 < cronjob["spec"]["successfulJobsHistoryLimit"] <= 30 and 0 < cronjob["spec"]["failedJobsHistoryLimit"] <= 30
    )
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
           for e in cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["JOB_UID"] == "metadata.labels['batch.kubernetes.io/controller-uid']"
    for name, spec in ray_cluster_specs():
        if name == "rayjob-train.yaml":
            continue  # a one-off training run: its GPUs are requested up front (replicas: 2)
        for g in spec["workerGroupSpecs"]:
            assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0, f"{name}/{g['groupName']} must scale to 0"


MIN_VERSIONS = {  # file -> KubeRay minimum its header must state (and no wrong one)
    "raycluster.yaml": "KubeRay >= 1.5.1",
    "rayjob-train.yaml": "KubeRay >= 1.5.1",
    "raycronjob-label.yaml": "KubeRay >= 1.6",
    "cronjob-label-fallback.yaml": "KubeRay >= 1.2",
}


@pytest.mark.parametrize("file,minimum", MIN_VERSIONS.items())
def test_minimum_versions_are_stated(file, minimum):
    text = (CLUSTER / "kuberay" / file).read_text()
    flat = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert minimum in flat, f"{file}: does not state {minimum}"
    assert not re.search(r"KubeRay >= 1\.5(?!\.1)\b|any KubeRay >= 1\.0|KubeRay >= 1\.0", flat), (
        f"{file}: wrong minimum"
    )
    uses_auth = any("authOptions" in json.dumps(spec) for name, spec in ray_cluster_specs() if name == file)
    version = tuple(int(x) for x in minimum.split(">= ")[1].split("."))
    assert not uses_auth or version >= (1, 5, 1), f"{file}: authOptions need KubeRay >= 1.5.1"
    if file == "raycronjob-label.yaml":
        assert "timeZone" in text and "1.7" in flat
    readme = (CLUSTER / "README.md").read_text()
    assert minimum.replace("KubeRay >= ", "") in readme


def test_service_accounts_live_in_their_own_manifest():
    """Applying the RayJob / RayCronJob never starts a permanent cluster to get its account, and
    workers do not share the head's (autoscaler) account."""
    for f in K8S_FILES:
        kinds = [d["kind"] for d in yaml.safe_load_all(f.read_text())]
        if "RayCluster" in kinds or "RayJob" in kinds or "RayCronJob" in kinds:
            names = [d["metadata"]["name"] for d in yaml.safe_load_all(f.read_text()) if d["kind"] == "ServiceAccount"]
            assert not any(n.startswith("emotion-ray") for n in names), f"{f.name} defines the Ray service accounts"
    accounts = {
        d["metadata"]["name"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "serviceaccounts.yaml").read_text())
    }
    assert set(accounts) == {"emotion-ray", "emotion-ray-worker"}
    for sa in accounts.values():
        assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    assert accounts["emotion-ray-worker"]["automountServiceAccountToken"] is False


def _fallback_script() -> str:
    cron = next(doc for _, doc in k8s_docs() if doc["kind"] == "CronJob")
    return cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]


STUB_KUBECTL = """#!/bin/sh
# kubectl stand-in: `create` succeeds, `get ... -o jsonpath=...` answers from the environment.
echo "$*" >> "$STUB_LOG"
case "$*" in
  create*) exit 0 ;;
  *jobDeploymentStatus*) printf '%s' "$STUB_DS" ;;
  *jobStatus*) printf '%s' "$STUB_S" ;;
  *message*) printf 'rejected by the stub' ;;
esac
"""


@pytest.mark.parametrize("deployment,job,rc", [("ValidationFailed", "", 1), ("Failed", "FAILED", 1),
                                               ("Complete", "FAILED", 1), ("Complete", "SUCCEEDED", 0)])
def test_fallback_wait_loop_ends_on_every_terminal_state(tmp_path, deployment, job, rc):
    """The CronJob's own script, under sh with a stub kubectl: a RayJob KubeRay rejects
    (ValidationFailed) must fail the night at once, not after the Job's 7 h deadline."""
    import time

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kubectl").write_text(STUB_KUBECTL)
    (bindir / "kubectl").chmod(0o755)
    (tmp_path / "template").mkdir()
    configmap = next(doc for _, doc in k8s_docs() if doc["kind"] == "ConfigMap")
    (tmp_path / "template" / "rayjob.yaml").write_text(configmap["data"]["rayjob.yaml"])
    script = _fallback_script().replace("/template/", f"{tmp_path}/template/").replace("/tmp/rayjob.yaml",
                                                                                      f"{tmp_path}/out.yaml")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "log"),
           "STUB_DS": deployment, "STUB_S": job, "JOB_NAME": "emotion-label-nightly-123", "JOB_UID": "u-1"}
    t0 = time.monotonic()
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode == rc, out.stdout + out.stderr
    assert time.monotonic() - t0 < 10
    assert (job if deployment == "Complete" else deployment) in out.stdout
    created = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert created["metadata"]["ownerReferences"][0] == {
        "apiVersion": "batch/v1", "kind": "Job", "name": "emotion-label-nightly-123", "uid": "u-1"}


def test_schedules_are_valid_and_nightly():
    schedules = [
        (name, doc["spec"]["schedule"]) for name, doc in k8s_docs() if doc["kind"] in ("CronJob", "RayCronJob")
    ]
    assert len(schedules) == 2
    for name, expr in schedules:
        assert valid_cron(expr), f"{name}: invalid cron {expr!r}"
        minute, hour, dom, month, dow = expr.split()
        assert (dom, month, dow) == ("*", "*", "*") and hour.isdigit(), f"{name}: not a nightly schedule"
    assert len({expr for _, expr in schedules}) == 1, "RayCronJob and its fallback should agree"


def test_fallback_cronjob_can_create_rayjobs():
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in k8s_docs() if "metadata" in doc}
    cron = next(d for (k, _), d in docs.items() if k == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    sa = pod["serviceAccountName"]
    assert ("ServiceAccount", sa) in docs
    binding = next(d for (k, _), d in docs.items() if k == "RoleBinding" and d["subjects"][0]["name"] == sa)
    role = docs[("Role", binding["roleRef"]["name"])]
    rule = next(r for r in role["rules"] if "rayjobs" in r["resources"])
    assert {"create", "get"} <= set(rule["verbs"]) and "ray.io" in rule["apiGroups"]
    assert not ({"delete", "*"} & set(rule["verbs"])), "least privilege"
    script = pod["containers"][0]["args"][0]
    check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    configmap = next(d for (k, _), d in docs.items() if k == "ConfigMap")
    template = configmap["data"]["rayjob.yaml"]
    assert "__DATE__" in template and "--date __DATE__" in " ".join(template.split())
    assert configmap["metadata"]["name"] in json.dumps(pod["volumes"])


def test_render_step_of_the_fallback_produces_the_nights_rayjob(tmp_path):
    """Run the CronJob's own render line (sed over the ConfigMap template) and parse the result."""
    docs = [doc for _, doc in k8s_docs()]
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    script = next(d for d in docs if d["kind"] == "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"][0]["args"][0]
    render = next(line for line in script.splitlines() if line.startswith("sed "))
    (tmp_path / "template").mkdir()
    (tmp_path / "template" / "rayjob.yaml").write_text(configmap["data"]["rayjob.yaml"])
    render = render.replace("/template/", f"{tmp_path}/template/").replace("/tmp/rayjob.yaml", f"{tmp_path}/out.yaml")
    env = {**os.environ, "D": "2026-11-20", "DAY": "20261120", "JOB_NAME": "nightly-1", "JOB_UID": "u-1"}
    subprocess.run(["sh", "-c", render], env=env, check=True)
    job = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert job["metadata"]["name"] == "emotion-label-20261120"
    assert "--date 2026-11-20" in job["spec"]["entrypoint"]


def test_s3_access_is_by_role_not_keys():
    for sa in (
        doc
        for _, doc in k8s_docs()
        if doc["kind"] == "ServiceAccount" and doc["metadata"]["name"] != "emotion-label-scheduler"
    ):
        arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", arn)
    for f in LAUNCHER_FILES:
        cfg = yaml.safe_load(f.read_text())
        for node_type, spec in cfg["available_node_types"].items():
            profile = spec["node_config"]["IamInstanceProfile"]
            assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+", profile["Arn"]), node_type


# ---------------------------------------------------------------- images and versions


IMAGE = re.compile(
    r"^(?:rayproject/ray:(?P<ray>[\d.]+)-(?P<py>py3\d+)(?:-[\w.]+)?"
    r"|(?:[\w.-]+/)*emotion-labelling:[\w.]+-ray(?P<ray2>[\d.]+)-(?P<py2>py3\d+)(?:-[\w.]+)?)$"
)


def all_images() -> list[tuple[str, str]]:
    images = []
    for name, spec in ray_cluster_specs():
        for pod in pod_specs(spec):
            images += [(name, c["image"]) for c in pod["containers"]]
    for name, spec in rayjob_specs():
        for c in (spec.get("submitterPodTemplate") or {}).get("spec", {}).get("containers", []):
            images.append((name, c["image"]))
    for f in LAUNCHER_FILES:
        images.append((f.name, yaml.safe_load(f.read_text())["docker"]["image"]))
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            images.append(("Dockerfile", line.split()[1]))
    return images


def test_images_match_pins():
    images = all_images()
    assert len(images) > 10
    for where, image in images:
        m = IMAGE.match(image)
        assert m, f"{where}: image {image!r} does not name its Ray and Python versions"
        assert (m.group("ray") or m.group("ray2")) == RAY, f"{where}: {image} is not Ray {RAY}"
        assert (m.group("py") or m.group("py2")) == python_tag(), f"{where}: {image} is not {python_tag()}"


def test_gpu_images_only_where_gpus_are():
    """CPU pods (head, CPU workers, submitters) use the -cpu image, which has no CUDA wheels;
    GPU pods use -gpu."""
    for name, spec in ray_cluster_specs():
        for pod in pod_specs(spec):
            for c in pod["containers"]:
                has_gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                assert c["image"].endswith("-gpu" if has_gpu else "-cpu"), f"{name}: {c['image']} (GPU: {has_gpu})"
    for name, spec in rayjob_specs():
        for c in (spec.get("submitterPodTemplate") or {}).get("spec", {}).get("containers", []):
            assert c["image"].endswith("-cpu"), name


def test_dockerfile_builds_pinned_and_checks_the_installed_package():
    text = (CLUSTER / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    by_name = {s.split()[2]: s for s in stages}
    assert set(by_name) == {"wheel", "cpu", "gpu"}
    # setuptools for pip's isolated build is pinned (`-c constraints.txt` does not reach it)
    m = re.search(r"--build-constraint (\S+)", by_name["wheel"])
    assert m, "the wheel must be built with --build-constraint"
    pins = (REPO / m.group(1)).read_text()
    version = re.search(r"^setuptools==([\d.]+)$", pins, re.M).group(1)
    floor = re.search(r'"setuptools>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert tuple(map(int, version.split("."))) >= tuple(map(int, floor.split(".")))
    assert re.search(r'pip install [^\n]*"pip==[\d.]+"', by_name["wheel"]), "pip itself is pinned"
    for target in ("cpu", "gpu"):
        stage = by_name[target]
        assert "COPY --from=wheel" in stage and "COPY emotion_core" not in stage and "COPY --chown" not in stage
        assert "-c /tmp/install/constraints.txt" in stage
        # the import check runs outside any source tree and proves the package came from site-packages
        assert "cd / && python -c" in stage and "/site-packages/" in stage
    assert "download.pytorch.org/whl/cpu" in by_name["cpu"] and "download.pytorch.org" not in by_name["gpu"]
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=13.0"' in by_name["gpu"]


# ---------------------------------------------------------------- the cluster launcher


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_cluster_launcher_config(path):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # Ray's own schema for cluster configs
    validate_config(prepare_config(cfg))  # and Ray's own checks after filling in AWS defaults
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not re.match(r"^(g|p)\d", head["node_config"]["InstanceType"]), "the head is CPU-only"
    gpu = [t for t in types.values() if re.match(r"^(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu and all(0 <= t["min_workers"] < t["max_workers"] for t in gpu)
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != cfg["head_node_type"]) >= cfg["max_workers"]
    mount = next(iter(cfg["file_mounts"]))
    assert cfg["file_mounts"][mount] == "."
    for name, t in types.items():
        node = t["node_config"]
        # an AMI with an NVIDIA driver >= 580 (not Ray's CUDA 11-era default DLAMI) ...
        assert "base-oss-nvidia-driver-gpu" in node["ImageId"] or node["ImageId"].startswith("ami-"), name
        # ... and a root volume no smaller than its snapshot (the default DLAMI's is 140 GB)
        volumes = [b["Ebs"]["VolumeSize"] for b in node["BlockDeviceMappings"] if b["DeviceName"] == "/dev/sda1"]
        assert volumes and volumes[0] >= 140, name
        is_gpu = re.match(r"^(g|p)\d", node["InstanceType"])
        if name == cfg["head_node_type"]:
            setup, image = cfg["head_setup_commands"], cfg["docker"]["image"]
        else:
            setup = t.get("worker_setup_commands", cfg["worker_setup_commands"])
            image = t.get("docker", {}).get("worker_image", cfg["docker"]["image"])
        setup = " ".join(cfg["setup_commands"] + setup)
        assert re.search(rf"pip install .*-c {re.escape(mount)}/constraints\.txt", setup), (
            f"{name}: install at the pins"
        )
        assert mount in setup
        assert image.endswith("-gpu" if is_gpu else "-cpu"), f"{name}: {image}"
        assert ("download.pytorch.org/whl/cpu" in setup) != bool(is_gpu), f"{name}: CPU nodes skip the CUDA wheels"
    assert ".venv" in cfg["rsync_exclude"]


# ---------------------------------------------------------------- entrypoints


def entrypoint_module(entrypoint: str) -> tuple[str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], f"entrypoint should be `python -m jobs.<name> ...`: {entrypoint!r}"
    return argv[2], argv[3:]


@cache
def module_help(module: str) -> str:
    """What `python -m MODULE --help` prints, from the module's main() in this process (every job's
    __main__ is `sys.exit(main())`; tests/test_train.py runs one as a real subprocess)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exited:
        importlib.import_module(module).main(["--help"])
    assert exited.value.code == 0, f"python -m {module} --help failed"
    return buf.getvalue()


def test_entrypoints_name_existing_modules_and_flags():
    seen = {}
    for name, spec in rayjob_specs():
        module, args = entrypoint_module(spec["entrypoint"])
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{name}: no module {module}"
        seen.setdefault(module, []).append((name, args))
    for module, uses in seen.items():  # one --help per distinct module
        text = module_help(module)
        for name, args in uses:
            for flag in (a.split("=")[0] for a in args if a.startswith("--")):
                assert re.search(rf"(^|\s){re.escape(flag)}\b", text), f"{name}: {module} has no option {flag}"


# ---------------------------------------------------------------- secrets


SECRET_NAMES = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY)", re.I)
SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"aws_secret_access_key|aws_session_token", re.I),
    re.compile(r"(?<![\w/+=])[A-Za-z0-9/+]{40}(?![\w/+=])"),  # 40-char AWS secret keys
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"^\s*[\w-]*(password|passwd)\s*[:=]\s*\S", re.I | re.M),
]


def _env_entries(obj):
    if isinstance(obj, dict):
        if "name" in obj and ("value" in obj or "valueFrom" in obj) and len(obj) <= 3:
            yield obj
        for v in obj.values():
            yield from _env_entries(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _env_entries(v)


@pytest.mark.parametrize("path", [*K8S_FILES, *LAUNCHER_FILES, CLUSTER / "Dockerfile"], ids=lambda p: p.name)
def test_no_secrets(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        m = pattern.search(text)
        assert not m, f"{path.name}: looks like a secret: {m.group(0)[:12]}..."
    if path.suffix == ".yaml":
        for doc in yaml.safe_load_all(text):
            for env in _env_entries(doc):
                assert not SECRET_NAMES.search(env["name"]) or "valueFrom" in env, (
                    f"{path.name}: env {env['name']} carries a literal secret value"
                )


def test_secret_scanner_catches_secrets():
    for bad in ["aws_secret_access_key = x", "AKIAABCDEFGHIJKLMNOP", "password: hunter2",
                "key: wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEYab"]:
        assert any(p.search(bad) for p in SECRET_PATTERNS), bad
