"""deploy/: the Kubernetes example (a Deployment + Service with /health probes and a grace period above
the drain) and the route to its replicas through a request router."""

from __future__ import annotations

from .conftest import REPO

import pytest


def test_kubernetes_example():
    yaml = pytest.importorskip("yaml")
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "kubernetes.yaml").read_text()) if d]
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    dep, svc = docs
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    argv = c["command"] + c["args"]
    assert argv[:5] == ["pyserve", "--host", "0.0.0.0", "--port", "8000"]
    timeout = float(argv[argv.index("--shutdown-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > timeout
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    assert any(e["name"] == "PYSERVE_KV_CACHE_MEMORY" for e in c["env"])
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", 8000)


def test_router_example_points_at_the_replicas():
    """deploy/router.yaml routes to the InferencePool its comment installs, and that pool selects the
    Deployment's pods on the port pyserve listens on."""
    yaml = pytest.importorskip("yaml")
    text = (REPO / "deploy" / "router.yaml").read_text()
    (route,) = [d for d in yaml.safe_load_all(text) if d]
    assert route["kind"] == "HTTPRoute"
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["group"], backend["kind"]) == ("inference.networking.k8s.io", "InferencePool")
    dep = next(d for d in yaml.safe_load_all((REPO / "deploy" / "kubernetes.yaml").read_text())
               if d and d["kind"] == "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert f"helm install {backend['name']} " in text
    assert f"matchLabels.app={labels['app']}" in text
    assert dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 8000
