"""The Kubernetes manifests in deploy/kubernetes/, checked offline.

- Every file parses; the Kustomize base and the demo overlay are composed here in Python (a small
  resolver: resources, strategic-merge patches, namespace, labels, images) and, when a ``kubectl``
  with its built-in kustomize is installed, compared with ``kubectl kustomize``'s own output.
- Every built object validates against the Kubernetes JSON schemas bundled in the
  ``kubernetes-validate`` package (strict: unknown fields are errors), for the oldest and the newest
  Kubernetes it knows; the validator is shown to reject a broken Deployment.
- The KEDA objects (no schema in that package) are checked against KEDA's CRD shape: apiVersion,
  the ScaledObject's fields, its scaleTargetRef, each trigger's metadata keys (redis: an address or
  host and port, listName, listLength), authentication references.
- Every ``KIE_*`` name is a real setting, the ConfigMap's values load as Settings, secrets come by
  reference only, serve's probes name routes the app has, the queue KEDA measures is the list the
  worker consumes (a real enqueue into a real Valkey lengthens it), and the manifests' worker and
  beat commands run for real: beat ticks, the worker's liveness command answers (and fails once
  the worker is gone), SIGTERM stops the worker within its grace period.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from kie_extend.config import Settings

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
DEMO = KUBE / "overlays" / "demo"
KUSTOMIZATION = "kustomization.yaml"
#: The Secret every kie-extend container reads its secrets from (the user creates it).
SECRET = "kie-extend"
#: Environment names in the manifests that are not KIE_* settings, and why they are there.
OTHER_ENV = {"REMAP_SIGTERM": "Celery: SIGTERM as a cold shutdown (held messages go straight back)"}
#: Settings whose values are secrets: they may only come from a secretKeyRef.
SECRET_SETTINGS = {"KIE_API_KEY", "KIE_API_TOKENS", "KIE_REDIS_URL", "KIE_BROKER_URL", "KIE_WEBHOOK_SECRET",
                   "KIE_CALLBACK_SECRET", "KIE_SESSION_SECRET", "KIE_SENTINEL_PASSWORD"}
#: Kinds that are not namespaced (kustomize's namespace leaves them alone).
CLUSTER_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

def _k8s_versions() -> tuple[str, str]:
    """The oldest and the newest Kubernetes whose schemas kubernetes-validate bundles."""
    from kubernetes_validate.utils import all_versions

    versions = all_versions()
    return versions[0], versions[-1]


#: Kubernetes versions to validate against (1.25.0 and 1.37.0 with kubernetes-validate 1.37.0).
K8S_VERSIONS = _k8s_versions()

# KEDA 2.x CRD shape (keda.sh/v1alpha1, as in KEDA's config/crd/bases and its scalers' metadata
# structs): the ScaledObject spec's fields and required ones, and per scaler type used here the
# metadata keys the scaler reads (also documented: scalers/redis-lists, scalers/prometheus).
KEDA_API = "keda.sh/v1alpha1"
SCALED_OBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                      "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "advanced", "fallback", "triggers"}
SCALE_TARGET_REF = {"name", "kind", "apiVersion", "envSourceContainerName"}
TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
REDIS_KEYS = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv",
              "passwordFromEnv", "listName", "listLength", "activationListLength", "enableTLS", "unsafeSsl",
              "databaseIndex"}
PROMETHEUS_KEYS = {"serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
                   "ignoreNullValues", "queryParameters", "unsafeSsl", "authModes", "awsRegion", "timeout",
                   "identityOwner"}
TRIGGER_AUTH_SPEC = {"secretTargetRef", "env", "configMapTargetRef", "hashiCorpVault", "azureKeyVault",
                     "awsSecretManager", "gcpSecretManager", "podIdentity", "boundServiceAccountToken", "filePath",
                     "oauth2"}
TRIGGER_AUTH_PARAMS = {"redis": {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
                                 "sentinelUsername", "sentinelPassword", "sentinelMaster", "tls", "ca", "cert",
                                 "key", "keyPassword"},
                       "prometheus": {"bearerToken", "username", "password", "ca", "cert", "key", "awsRegion"}}


# -- a small kustomize: what the base and the overlay use -------------------------------------------

def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge_list(base: list[Any], patch: list[Any]) -> list[Any]:
    """Lists of named objects (containers, env, ports, volumes) merge by name; others are replaced."""
    if not (base and patch and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for item in patch:
        for i, have in enumerate(out):
            if have["name"] == item["name"]:
                out[i] = merge(have, item, strategic=True)
                break
        else:
            out.append(copy.deepcopy(item))
    return out


def merge(base: dict[str, Any], patch: dict[str, Any], strategic: bool) -> dict[str, Any]:
    """A strategic-merge patch for built-in kinds (``strategic``), a JSON merge patch otherwise (lists replaced)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, strategic)
        elif strategic and isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = _merge_list(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    tmpl = obj.get("spec", {}).get("template", {}).get("spec")
    return [tmpl] if tmpl else []


def build(folder: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize folder`` would print (for the features used here)."""
    kz = yaml.safe_load((folder / KUSTOMIZATION).read_text())
    assert set(kz) <= {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images"}, \
        f"{folder}: a kustomize feature this resolver does not know: {sorted(set(kz))}"
    objs: list[dict[str, Any]] = []
    for res in kz.get("resources", []):
        target = (folder / res).resolve()
        assert target.exists(), f"{folder / KUSTOMIZATION} lists {res}, which does not exist"
        objs += build(target) if target.is_dir() else load_docs(target)
    for patch in kz.get("patches", []):
        assert set(patch) == {"path"}, patch
        for p in load_docs(folder / patch["path"]):
            found = [i for i, o in enumerate(objs) if o["kind"] == p["kind"] and
                     o["metadata"]["name"] == p["metadata"]["name"]]
            assert len(found) == 1, f"patch {patch['path']}: no single {p['kind']}/{p['metadata']['name']}"
            strategic = "." not in p["apiVersion"].split("/")[0]  # built-in groups (v1, apps, policy)
            objs[found[0]] = merge(objs[found[0]], p, strategic)
    for lab in kz.get("labels", []):
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(lab["pairs"])
    for img in kz.get("images", []):
        for o in objs:
            for spec in _pod_specs(o):
                for c in spec.get("containers", []):
                    if c["image"].split(":")[0] == img["name"]:
                        c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    if "namespace" in kz:
        for o in objs:
            if o["kind"] not in CLUSTER_KINDS:
                o["metadata"]["namespace"] = kz["namespace"]
    return objs


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def containers(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["name"], c) for o in objs for spec in _pod_specs(o) for c in spec["containers"]]


BUILDS = {"base": BASE, "demo": DEMO}


@pytest.fixture(scope="module", params=sorted(BUILDS))
def built(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, build(BUILDS[request.param])


# -- files and composition --------------------------------------------------------------------------

def test_every_manifest_parses_and_is_used() -> None:
    files = sorted(KUBE.rglob("*.yaml"))
    assert len(files) >= 10
    listed: set[Path] = set()
    for kz in KUBE.rglob(KUSTOMIZATION):
        doc = yaml.safe_load(kz.read_text())
        assert doc["kind"] == "Kustomization" and doc["apiVersion"].startswith("kustomize.config.k8s.io/")
        listed |= {(kz.parent / r).resolve() for r in doc.get("resources", [])}
        listed |= {(kz.parent / p["path"]).resolve() for p in doc.get("patches", [])}
    for f in files:
        if f.name == KUSTOMIZATION:
            continue
        docs = load_docs(f)
        assert docs, f"{f} is empty"
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(d) and d["metadata"]["name"], f
        assert f.resolve() in listed, f"{f.relative_to(ROOT)} is in no kustomization"


def test_the_overlay_builds_on_the_base() -> None:
    base, demo = build(BASE), build(DEMO)
    names = {(o["kind"], o["metadata"]["name"]) for o in base}
    assert names <= {(o["kind"], o["metadata"]["name"]) for o in demo}
    assert {("Deployment", "redis"), ("Deployment", "simulator")} <= {(o["kind"], o["metadata"]["name"]) for o in demo}
    assert {o["metadata"].get("namespace") for o in demo} == {"kie-extend-demo"}
    cm = by_kind(demo, "ConfigMap")["kie-extend"]["data"]
    assert cm["KIE_BASE_URL"] == "http://simulator:8787" and cm["KIE_QUEUE"] == "kie_extend"  # patched, kept
    assert by_kind(demo, "Deployment")["kie-extend-serve"]["spec"]["replicas"] == 1
    assert by_kind(demo, "ScaledObject")["kie-extend-worker"]["spec"]["maxReplicaCount"] == 3
    assert all(c["image"] == "kie-extend:local" for _, c in containers(demo) if c["name"] != "redis")


def test_the_resolver_can_fail(tmp_path: Path) -> None:
    """A kustomization naming a file that is not there is reported (the composition check checks)."""
    (tmp_path / KUSTOMIZATION).write_text("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                                          "resources: [../../nowhere/base]\n")
    with pytest.raises(AssertionError, match="does not exist"):
        build(tmp_path)


def _normal(objs: list[dict[str, Any]]) -> list[str]:
    return sorted(yaml.safe_dump(o, sort_keys=True) for o in objs)


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_resolver_agrees_with_kubectl_kustomize(name: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl here: the overlay is resolved in Python only (test_the_overlay_builds_on_the_base)")
    out = subprocess.run([kubectl, "kustomize", str(BUILDS[name])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert _normal([d for d in yaml.safe_load_all(out.stdout) if d]) == _normal(build(BUILDS[name]))


# -- the Kubernetes schemas ---------------------------------------------------------------------------

def test_every_object_validates_against_the_kubernetes_schemas(built: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    _, objs = built
    checked = 0
    for obj in objs:
        if obj["apiVersion"] == KEDA_API:
            continue  # KEDA's CRDs: test_keda_*
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")
            checked += 1
    assert checked >= 2 * 7


def test_the_schema_validator_rejects_a_broken_deployment() -> None:
    import kubernetes_validate

    deploy = copy.deepcopy(by_kind(build(BASE), "Deployment")["kie-extend-worker"])
    deploy["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSIONS[-1], strict=True)
    deploy = copy.deepcopy(by_kind(build(BASE), "Deployment")["kie-extend-worker"])
    deploy["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # misspelt: strict rejects it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSIONS[-1], strict=True)


# -- the workloads ----------------------------------------------------------------------------------

def test_workloads_have_resources_and_the_beat_is_single(built: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = built
    deps = by_kind(objs, "Deployment")
    for name, c in containers(objs):
        res = c.get("resources", {})
        assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{name}/{c['name']}: requests"
        assert "memory" in res.get("limits", {}), f"{name}/{c['name']}: a memory limit"
    beat = deps["kie-extend-beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"] == {"type": "Recreate"}
    assert "Recreate" in (BASE / "beat.yaml").read_text().split("apiVersion")[0], "the reason is in a comment"
    assert beat["spec"]["template"]["spec"]["containers"][0]["command"][:4] == ["celery", "-A", "kie_extend.worker", "beat"]
    worker = deps["kie-extend-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["command"][:4] == ["celery", "-A", "kie_extend.worker", "worker"]
    assert "-Q" not in worker["command"], "the worker consumes KIE_QUEUE, the list KEDA measures"
    pdbs = by_kind(objs, "PodDisruptionBudget")
    selected = {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for p in pdbs.values()}
    assert selected == {"serve", "worker"}
    keda_min = by_kind(objs, "ScaledObject")["kie-extend-worker"]["spec"]["minReplicaCount"]
    for name, pdb in pdbs.items():
        labels = pdb["spec"]["selector"]["matchLabels"]
        [dep] = [d for d in deps.values() if labels.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len({"minAvailable", "maxUnavailable"} & set(pdb["spec"])) == 1, name
        if "minAvailable" in pdb["spec"]:
            # A budget that leaves no pod to evict blocks every node drain.
            fewest = keda_min if dep["metadata"]["name"] == "kie-extend-worker" else dep["spec"]["replicas"]
            assert pdb["spec"]["minAvailable"] < fewest, f"{name} would block node drains"


def test_serve_probes_name_the_apps_health_routes(built: tuple[str, list[dict[str, Any]]], make_settings: Any) -> None:
    from kie_extend.http.app import create_app

    _, objs = built
    routes = {getattr(r, "path", None) for r in create_app(make_settings()).routes}
    serve = by_kind(objs, "Deployment")["kie-extend-serve"]["spec"]["template"]["spec"]["containers"][0]
    assert serve["livenessProbe"]["httpGet"]["path"] == "/livez"  # ignores Redis (http/health.py)
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the job store and the broker
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert serve[probe]["httpGet"]["path"] in routes
        assert serve[probe]["httpGet"]["port"] == serve["ports"][0]["name"]
    port = serve["command"][serve["command"].index("--port") + 1]
    assert int(port) == serve["ports"][0]["containerPort"]
    svc = by_kind(objs, "Service")["kie-extend-serve"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"].items() <= by_kind(objs, "Deployment")["kie-extend-serve"]["spec"]["template"][
        "metadata"]["labels"].items()


# -- settings and secrets -----------------------------------------------------------------------------

def _env_names(objs: list[dict[str, Any]]) -> set[str]:
    names = set(by_kind(objs, "ConfigMap")["kie-extend"]["data"])
    for _, c in containers(objs):
        names |= {e["name"] for e in c.get("env", [])}
    return names


def test_env_names_are_real_settings(built: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = built
    settings = {f"KIE_{name.upper()}" for name in Settings.model_fields}
    unknown = {n for n in _env_names(objs) if n not in settings and n not in OTHER_ENV}
    assert not unknown, f"not a setting in config.py: {sorted(unknown)}"
    assert "KIE_SUBMIT_RATE" in settings and "KIE_NO_SUCH_THING" not in settings  # the check can fail


def test_the_configmap_loads_as_settings(built: tuple[str, list[dict[str, Any]]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap's values, plus placeholder secrets, are valid Settings (as a pod would read them)."""
    _, objs = built
    for key in [k for k in os.environ if k.startswith("KIE_")]:
        monkeypatch.delenv(key)
    data = by_kind(objs, "ConfigMap")["kie-extend"]["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values are strings"
    for key, value in {**data, "KIE_API_KEY": "placeholder", "KIE_REDIS_URL": "redis://redis:6379/0",
                       "KIE_API_TOKENS": "a-long-placeholder-token"}.items():
        monkeypatch.setenv(key, value)
    s = Settings(_env_file=None)
    assert s.queue == data["KIE_QUEUE"] and s.base_url == data["KIE_BASE_URL"]


def test_secrets_come_by_reference_only(built: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = built
    assert not by_kind(objs, "Secret"), "no Secret object: the user creates it (docs/kubernetes.md)"
    assert not (SECRET_SETTINGS & set(by_kind(objs, "ConfigMap")["kie-extend"]["data"]))
    keys: set[str] = set()
    for name, c in containers(objs):
        for e in c.get("env", []):
            if e["name"] in SECRET_SETTINGS:
                assert "value" not in e, f"{name}: {e['name']} has a literal value"
                ref = e["valueFrom"]["secretKeyRef"]
                assert ref["name"] == SECRET
                keys.add(ref["key"])
        for src in c.get("envFrom", []):
            assert "secretRef" not in src or src["secretRef"]["name"] == SECRET
    for auth in by_kind(objs, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == SECRET
            keys.add(ref["key"])
    assert keys == {"api-key", "api-tokens", "redis-url", "redis-password"}
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    for key in keys:
        assert f"{key}=" in doc, f"docs/kubernetes.md does not show the Secret's key {key}"


# -- KEDA -------------------------------------------------------------------------------------------

def test_keda_scaled_object_has_keda_shape(built: tuple[str, list[dict[str, Any]]]) -> None:
    check_keda(built[1])


def test_the_keda_check_can_fail() -> None:
    """Misspelt or missing trigger fields are reported."""
    for path, value in ((("metadata", "listname"), "kie_extend"), (("metadata", "listName"), "other_queue"),
                        (("metadata", "listLength"), 20), (("metdata",), {})):
        objs = build(BASE)
        trig = by_kind(objs, "ScaledObject")["kie-extend-worker"]["spec"]["triggers"][0]
        where = trig
        for key in path[:-1]:
            where = where[key]
        where[path[-1]] = value
        with pytest.raises((AssertionError, KeyError)):
            check_keda(objs)


def check_keda(objs: list[dict[str, Any]]) -> None:
    """Assert the KEDA objects of a build have KEDA's shape (see the sets above)."""
    scaled = by_kind(objs, "ScaledObject")
    assert list(scaled) == ["kie-extend-worker"]
    so = scaled["kie-extend-worker"]
    assert so["apiVersion"] == KEDA_API
    spec = so["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, sorted(set(spec) - SCALED_OBJECT_SPEC)
    assert {"scaleTargetRef", "triggers"} <= set(spec) and spec["triggers"]  # required
    assert set(spec["scaleTargetRef"]) <= SCALE_TARGET_REF
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target["name"] in by_kind(objs, "Deployment")
    assert target["name"] == "kie-extend-worker"
    for field in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
        assert isinstance(spec[field], int) and spec[field] >= 0, field
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    auths = by_kind(objs, "TriggerAuthentication")
    types = []
    for trig in spec["triggers"]:
        assert set(trig) <= TRIGGER_FIELDS and {"type", "metadata"} <= set(trig), trig
        meta = trig["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), f"{trig['type']}: KEDA metadata values are strings"
        types.append(trig["type"])
        if trig["type"] == "redis":
            assert set(meta) <= REDIS_KEYS, sorted(set(meta) - REDIS_KEYS)
            assert "address" in meta or {"host", "port"} <= set(meta) or "addressFromEnv" in meta
            host, _, port = meta["address"].rpartition(":")
            assert host and port.isdigit()
            assert int(meta["listLength"]) > 0 and int(meta.get("activationListLength", "0")) >= 0
            assert int(meta.get("databaseIndex", "0")) >= 0
            # The list is the Celery queue: KIE_QUEUE in the ConfigMap.
            assert meta["listName"] == by_kind(objs, "ConfigMap")["kie-extend"]["data"]["KIE_QUEUE"]
        elif trig["type"] == "prometheus":
            assert set(meta) <= PROMETHEUS_KEYS, sorted(set(meta) - PROMETHEUS_KEYS)
            assert meta["serverAddress"].startswith(("http://", "https://"))
            assert "kie_extend_waiting" in meta["query"] and float(meta["threshold"]) > 0
        else:
            pytest.fail(f"unexpected trigger type {trig['type']}")
        if "authenticationRef" in trig:
            auth = auths[trig["authenticationRef"]["name"]]
            assert auth["apiVersion"] == KEDA_API and set(auth["spec"]) <= TRIGGER_AUTH_SPEC
            assert all(set(r) == {"parameter", "name", "key"} for r in auth["spec"]["secretTargetRef"])
            assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} <= TRIGGER_AUTH_PARAMS[trig["type"]]
    assert types[0] == "redis"


def test_base_scales_on_the_queue_and_the_waiting_count() -> None:
    spec = by_kind(build(BASE), "ScaledObject")["kie-extend-worker"]["spec"]
    assert [t["type"] for t in spec["triggers"]] == ["redis", "prometheus"]


def test_the_waiting_metric_is_what_serve_exports(make_settings: Any) -> None:
    """The Prometheus trigger's metric is one /metrics really has (rendered from a real Valkey)."""
    from kie_extend.infra.metrics import render
    from kie_extend.infra.runtime import Runtime

    names = {line.split(" ")[0].split("{")[0] for line in render(Runtime(make_settings())).splitlines()
             if line and not line.startswith("#")}
    assert "kie_extend_waiting" in names


def test_the_queue_keda_measures_is_the_list_a_job_message_lands_in(tmp_path: Path) -> None:
    """enqueue_extend with the ConfigMap's KIE_QUEUE puts one message on the Redis list of that name
    (the broker database KEDA reads), and the worker app consumes that queue by default."""
    from kie_extend.api import enqueue_extend
    from kie_extend.infra.embedded import EmbeddedValkey
    from kie_extend.worker import create_app

    objs = build(BASE)
    queue = by_kind(objs, "ConfigMap")["kie-extend"]["data"]["KIE_QUEUE"]
    meta = by_kind(objs, "ScaledObject")["kie-extend-worker"]["spec"]["triggers"][0]["metadata"]
    server = EmbeddedValkey(str(tmp_path / "valkey")).start()
    try:
        db = int(meta.get("databaseIndex", "0"))
        settings = Settings(_env_file=None, redis_url=f"{server.url.rsplit('/', 1)[0]}/{db}", queue=queue,
                            key_prefix="k8stest", api_key="test-key-0123456789", allow_private_urls=True,
                            callback_base_url="http://127.0.0.1:9/unused")
        client = redis.Redis.from_url(settings.redis_url)
        assert client.llen(meta["listName"]) == 0
        enqueue_extend({"uploadUrl": "https://example.org/a.mp3", "defaultParamFlag": False, "model": "V5",
                        "continueAt": 3, "prompt": "p"}, settings=settings)
        assert client.llen(meta["listName"]) == 1
        assert create_app(settings).conf.task_default_queue == meta["listName"]
        client.close()
    finally:
        server.stop()


# -- the worker and beat commands and the worker's liveness command, for real ---------------------------

def _start(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], grace: float) -> float:
    """SIGTERM the process group as Kubernetes does; seconds until it exited (SIGKILL after ``grace``)."""
    started = time.monotonic()
    os.killpg(proc.pid, 15)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)
    return time.monotonic() - started


def test_worker_and_beat_commands_run_and_the_worker_probe_answers(tmp_path: Path) -> None:
    """The manifests' worker and beat commands, with the ConfigMap, test secrets and our own Valkey:
    beat ticks; the worker's liveness command exits 0 while the worker runs and non-zero once it is
    gone; SIGTERM stops the worker within its terminationGracePeriodSeconds."""
    from kie_extend.infra.embedded import EmbeddedValkey
    from kie_extend.store.keys import Keys

    objs = build(BASE)
    deps = by_kind(objs, "Deployment")
    worker_pod, beat_pod = (deps[n]["spec"]["template"]["spec"] for n in ("kie-extend-worker", "kie-extend-beat"))
    worker_spec, beat_spec = worker_pod["containers"][0], beat_pod["containers"][0]
    probe = worker_spec["livenessProbe"]["exec"]["command"]
    beat_cmd = list(beat_spec["command"])
    beat_cmd[beat_cmd.index("-s") + 1] = str(tmp_path / "celerybeat-schedule")  # not the host's /tmp
    server = EmbeddedValkey(str(tmp_path / "valkey")).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIE_")}
    env.update(by_kind(objs, "ConfigMap")["kie-extend"]["data"])
    env.update({"KIE_REDIS_URL": server.url, "KIE_API_KEY": "test-key-0123456789", "KIE_KEY_PREFIX": "k8sprobe",
                "HOSTNAME": socket.gethostname(),
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")})
    worker_env = {**env, **{e["name"]: e["value"] for e in worker_spec["env"] if "value" in e}}
    client = redis.Redis.from_url(server.url)
    worker = _start(worker_spec["command"], worker_env, tmp_path / "worker.log")
    beat = _start(beat_cmd, env, tmp_path / "beat.log")
    try:
        deadline = time.monotonic() + 60  # Celery logs "celery@host ready." once it consumes
        while time.monotonic() < deadline and " ready." not in (tmp_path / "worker.log").read_text():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(0.5)
        out = subprocess.run(probe, env=worker_env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr + (tmp_path / "worker.log").read_text()[-2000:]
        assert "pong" in out.stdout
        tick_key = Keys("k8sprobe").tick_last
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not client.hget(tick_key, "at"):
            assert beat.poll() is None, (tmp_path / "beat.log").read_text()[-2000:]
            time.sleep(0.5)
        assert client.hget(tick_key, "at"), "beat never finished a tick: " + (tmp_path / "beat.log").read_text()[-2000:]
    finally:
        took = _stop(worker, worker_pod["terminationGracePeriodSeconds"])
        _stop(beat, beat_pod["terminationGracePeriodSeconds"])
    assert worker.returncode is not None and took < worker_pod["terminationGracePeriodSeconds"], took
    try:
        gone = subprocess.run(probe, env=worker_env, capture_output=True, text=True, timeout=30)
        assert gone.returncode != 0, gone.stdout
    finally:
        client.close()
        server.stop()
