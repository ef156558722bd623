"""deploy/: the Kubernetes example (a Deployment + Service with /health probes and a grace period above
the drain), the route to its replicas through a request router, and one tensor-parallel group over the pods
of a LeaderWorkerSet."""

from __future__ import annotations

import re

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


# ---- deploy/leaderworkerset.yaml: one tensor-parallel group over the pods of a LeaderWorkerSet ----------

LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")  # what the LWS controller sets


def _lws_example():
    """(LeaderWorkerSet, Service, leader container, worker container)."""
    yaml = pytest.importorskip("yaml")
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "leaderworkerset.yaml").read_text()) if d]
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
                                                             ("v1", "Service")]
    lws, svc = docs
    tpl = lws["spec"]["leaderWorkerTemplate"]
    (leader,) = tpl["leaderTemplate"]["spec"]["containers"]
    (worker,) = tpl["workerTemplate"]["spec"]["containers"]
    return lws, svc, leader, worker


def _expand(args: list[str], env: dict) -> list[str]:
    """The kubelet's $(VAR) expansion of a container's args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _port_number(container: dict, port) -> int:
    """A probe's or Service's port (a name or a number) as the container's port number."""
    if isinstance(port, int):
        return port
    (p,) = [p for p in container.get("ports", ()) if p.get("name") == port]
    return p["containerPort"]


def _torchrun(container: dict, worker_index: int, size: int):
    """The container's torchrun command as torchrun parses it, in the pod of that worker index."""
    run = pytest.importorskip("torch.distributed.run")
    assert container["command"] == ["torchrun"]
    env = {"LWS_LEADER_ADDRESS": "pyserve-tp-0.pyserve-tp.default", "LWS_GROUP_SIZE": str(size),
           "LWS_WORKER_INDEX": str(worker_index), **{e["name"]: e["value"] for e in container.get("env", ())}}
    return run.get_args_parser().parse_args(_expand(container["args"], env))


def test_leaderworkerset_runs_one_group_over_its_pods():
    """Both templates run the same command (any difference would build a different engine on one rank);
    the LWS worker index is torchrun's node rank, so the leader is RANK 0; the group spans exactly the
    LWS's pods; and the pyserve flags are ones pyserve accepts."""
    from pyserve.cli import build_parser

    lws, _, leader, worker = _lws_example()
    tpl = lws["spec"]["leaderWorkerTemplate"]
    size = tpl["size"]
    for key in ("image", "command", "args", "env", "volumeMounts", "resources"):
        assert leader.get(key) == worker.get(key), key
    assert tpl["leaderTemplate"]["spec"]["volumes"] == tpl["workerTemplate"]["spec"]["volumes"]
    # A $(VAR) the kubelet cannot resolve stays literal: only the controller's and the container's own.
    own = {e["name"] for e in leader.get("env", ())}
    assert set(re.findall(r"\$\((\w+)\)", " ".join(leader["args"]))) <= set(LWS_ENV) | own
    pods = [_torchrun(leader if index == 0 else worker, index, size) for index in range(size)]
    assert [t.node_rank for t in pods] == list(range(size))
    t = pods[0]
    assert t.rdzv_backend == "static"  # node rank -> RANK, so node 0 is the rank that serves
    assert t.nnodes == str(size)
    assert t.module and t.training_script == "pyserve"
    args = build_parser().parse_args(t.training_script_args)
    assert args.tensor_parallel_size == int(t.nnodes) * int(t.nproc_per_node)
    assert tpl["restartPolicy"] == "RecreateGroupOnPodRestart"
    # LeaderReady would wait for a leader that is only ready once the workers have loaded.
    assert lws["spec"].get("startupPolicy", "LeaderCreated") == "LeaderCreated"
    # The rendezvous endpoint is the leader's address, on a port its container declares.
    host, port = pods[-1].rdzv_endpoint.rsplit(":", 1)
    assert host == "pyserve-tp-0.pyserve-tp.default"
    assert int(port) in [p["containerPort"] for p in leader["ports"]]
    # The model is on a volume both pods mount.
    mounts = [m["mountPath"].rstrip("/") + "/" for m in leader["volumeMounts"]]
    assert any(args.model.startswith(m) for m in mounts)
    # Each rank gets the cores of its pod's CPU limit, not the node's.
    cpu = leader["resources"]["limits"]["cpu"]
    assert leader["resources"]["requests"]["cpu"] == cpu
    omp = {e["name"]: e["value"] for e in leader["env"]}["OMP_NUM_THREADS"]
    assert int(omp) * int(t.nproc_per_node) == int(cpu)


def test_leaderworkerset_serves_from_the_leader_only():
    """The leader's probes and the Service reach the port --port names; the Service selects the leader pod
    alone (the worker binds no port); the worker has no HTTP probes."""
    from pyserve.cli import build_parser

    lws, svc, leader, worker = _lws_example()
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    port = build_parser().parse_args(_torchrun(leader, 0, size).training_script_args).port
    assert port in [p["containerPort"] for p in leader["ports"]]
    for probe in ("startupProbe", "readinessProbe"):
        get = leader[probe]["httpGet"]
        assert get["path"] == "/health"
        assert _port_number(leader, get["port"]) == port
    assert leader["startupProbe"]["periodSeconds"] * leader["startupProbe"]["failureThreshold"] >= 600
    assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(worker)
    assert port not in [p["containerPort"] for p in worker.get("ports", ())]
    assert svc["spec"]["selector"] == {LWS_NAME_LABEL: lws["metadata"]["name"], LWS_INDEX_LABEL: "0"}
    (svc_port,) = svc["spec"]["ports"]
    assert _port_number(leader, svc_port["targetPort"]) == port


def test_leaderworkerset_drains_before_anything_is_killed():
    """On SIGTERM rank 0 drains for --shutdown-timeout plus the abort grace; torchrun must not SIGKILL it
    sooner, nor the kubelet kill torchrun; and the worker (signalled at the same time when the group is
    deleted) must outlive the drain, or every in-flight request fails."""
    from pyserve.cli import build_parser
    from pyserve.server.lifecycle import ABORT_GRACE_SECONDS

    lws, _, leader, worker = _lws_example()
    tpl = lws["spec"]["leaderWorkerTemplate"]
    t = _torchrun(leader, 0, tpl["size"])
    drain = build_parser().parse_args(t.training_script_args).shutdown_timeout + ABORT_GRACE_SECONDS
    assert t.shutdown_timeout > drain
    assert tpl["leaderTemplate"]["spec"]["terminationGracePeriodSeconds"] > t.shutdown_timeout
    sleep = worker["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= t.shutdown_timeout
    assert tpl["workerTemplate"]["spec"]["terminationGracePeriodSeconds"] > int(sleep[1])
