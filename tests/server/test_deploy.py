"""deploy/kubernetes.yaml: a Deployment + Service with /health probes and a grace period above the drain."""

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
