"""deploy/kubernetes: every overlay renders with `kubectl kustomize`, every resource
validates against the Kubernetes schemas (kubernetes-validate, strict), and the
manifests agree with the configuration mboxd itself derives from them (`mboxd
config` over the rendered ConfigMap, args and env): ports, probes, volumes, the
termination grace period, the memory bound, and what protects each listener (gRPC
on the pod's loopback in a sidecar; TLS and tokens from Secrets, mounted where the
configuration looks for them, everywhere else)."""

import json
import os
import pathlib
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from harness import ROOT, mboxd_binary

OVERLAYS = ["standalone", "sidecar", "s3", "servicemonitor", "reader"]
# Native sidecars (init containers with restartPolicy: Always) are on by default
# from Kubernetes 1.29.
K8S_VERSION = "1.30.0"
# The user the image runs as: deploy/Dockerfile's USER.
IMAGE_UID = int(re.search(r"^USER (\d+)$", (ROOT / "deploy/Dockerfile").read_text(), re.M).group(1))


def kubectl() -> str:
    path = os.environ.get("MBOXD_KUBECTL") or shutil.which("kubectl")
    if not path:
        pytest.fail("kubectl not found: ./scripts/test.sh installs Debian's kubernetes-client")
    return path


def render(overlay: str) -> list[dict]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "deploy/kubernetes/overlays" / overlay)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        hint = ""
        if "components" in done.stderr:
            hint = " (Kustomize components need kubectl 1.21 or later; set MBOXD_KUBECTL to one)"
        pytest.fail(f"kubectl kustomize {overlay} failed{hint}: {done.stderr}")
    out = done.stdout
    return [d for d in yaml.safe_load_all(out) if d]


def quantity(q) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    q = str(q)
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * factor)
    return int(q)


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''} rendered"
    return found


def pod_spec(docs) -> dict:
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            return d["spec"]["template"]
    raise AssertionError("no workload rendered")


def mboxd_container(spec: dict) -> dict:
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    return next(c for c in containers if c["name"] == "mboxd")


def effective_config(docs, spec: dict, container: dict, tmp_path: pathlib.Path) -> dict:
    """What `mboxd config` makes of the container's args and env, with the rendered
    ConfigMap standing in for its mounted file."""
    args = list(container.get("args", []))
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec["volumes"]}
    if "--config" in args:
        i = args.index("--config") + 1
        path = pathlib.PurePosixPath(args[i])
        volume = volumes[mounts[str(path.parent)]]
        configmap = find(docs, "ConfigMap", volume["configMap"]["name"])[0]
        local = tmp_path / path.name
        local.write_text(configmap["data"][path.name])
        args[i] = str(local)
    env = {"PATH": os.environ["PATH"]}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    out = subprocess.run([mboxd_binary(), "config", *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def test_mboxd_config_prints_the_allocator_purge_delay(tmp_path):
    run = lambda *args, **env: json.loads(subprocess.run(
        [mboxd_binary(), "config", "--data-dir", str(tmp_path), *args], check=True, capture_output=True, text=True,
        env={"PATH": os.environ["PATH"], **env}).stdout)["allocator_purge_delay_ms"]
    # mboxd config prints the allocator's own value after start-up's setting: mboxd's
    # default, set over the allocator's environment variable, and the sidecar preset's.
    assert run() == 300
    assert run(MIMALLOC_PURGE_DELAY="250") == 300
    assert run("--config", str(ROOT / "config" / "sidecar.toml")) == 0


def test_mboxd_config_reports_huge_pages_off(tmp_path):
    # Read back from the kernel by the process itself: the heap is kept in 4 KiB
    # pages, which a memory-limited pod counts byte for byte.
    out = subprocess.run([mboxd_binary(), "config", "--data-dir", str(tmp_path)], check=True,
                         capture_output=True, text=True, env={"PATH": os.environ["PATH"]}).stdout
    assert json.loads(out)["transparent_huge_pages"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_validates_and_agrees_with_mboxd_config(overlay, tmp_path):
    docs = render(overlay)

    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # A CRD: no upstream schema; checked below.
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")

    template = pod_spec(docs)
    spec = template["spec"]
    mboxd = mboxd_container(spec)
    cfg = effective_config(docs, spec, mboxd, tmp_path)
    ports = {p["name"]: p["containerPort"] for p in mboxd["ports"]}

    # Ports: gRPC on the pod IP behind a Service, or (sidecar) on the pod's loopback
    # only, where the trainer reaches it and no other pod can; the HTTP listener
    # (metrics, probes) on the pod IP.
    if overlay == "sidecar":
        assert cfg["listen"] == "127.0.0.1:8085", "a sidecar's gRPC stays on the pod's loopback"
        assert cfg["allocator_purge_delay_ms"] == 0, "freed memory goes back at once, within the pod's bound"
        assert ports == {"metrics": 9185}, "no gRPC port on the pod IP"
    else:
        assert cfg["listen"] == f"0.0.0.0:{ports['grpc']}"
        # ...and the defaults the image and the README use.
        assert ports == {"grpc": 8085, "metrics": 9185}
    assert cfg["metrics_listen"] == f"0.0.0.0:{ports['metrics']}"

    # Probes: /healthz on the HTTP listener (the kubelet reaches neither the
    # loopback nor, speaking no TLS, a TLS gRPC port), in HTTPS when TLS is on.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = mboxd[probe]["httpGet"]
        assert "grpc" not in mboxd[probe], probe
        assert get["path"] == "/healthz", probe
        assert get["port"] in ("metrics", ports["metrics"]), probe
        assert get.get("scheme", "HTTP") == ("HTTPS" if cfg["tls"] else "HTTP"), probe

    # Protection: what other pods can reach is served in TLS, with tokens.
    secret_mounts = {}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in mboxd["volumeMounts"]:
        secret = volumes[m["name"]].get("secret")
        if secret:
            assert not secret.get("optional"), "no Secret, no pod: never serve unprotected"
            secret_mounts[m["mountPath"]] = secret["secretName"]

    def secret_of(path: str) -> str:
        p = pathlib.PurePosixPath(path)
        assert str(p.parent) in secret_mounts, f"{path} is not in a mounted Secret"
        return secret_mounts[str(p.parent)], p.name

    if overlay == "sidecar":
        assert cfg["tls"] is None and cfg["auth"]["enabled"] is False
    else:
        assert secret_of(cfg["tls"]["cert_file"]) == ("mboxd-tls", "tls.crt")
        assert secret_of(cfg["tls"]["key_file"]) == ("mboxd-tls", "tls.key")
        assert cfg["auth"]["enabled"] is True
        assert secret_of(cfg["auth"]["tokens_file"]) == ("mboxd-tokens", "tokens.toml")

    # Volumes: the data folder is a mounted volume (the root file system is
    # read-only), an emptyDir in a sidecar and a claim that exists otherwise; a
    # reader writes nothing and mounts none.
    assert mboxd["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in mboxd["volumeMounts"]}
    if overlay == "reader":
        assert cfg["data_dir"] not in mounts
        assert not any("persistentVolumeClaim" in v or "emptyDir" in v for v in spec["volumes"])
    else:
        data = {v["name"]: v for v in spec["volumes"]}[mounts[cfg["data_dir"]]]
        if overlay == "sidecar":
            assert quantity(data["emptyDir"]["sizeLimit"]) > cfg["spool_max_bytes"]
        else:
            claim = data["persistentVolumeClaim"]["claimName"]
            find(docs, "PersistentVolumeClaim", claim)
    assert spec["securityContext"]["runAsUser"] == IMAGE_UID
    assert spec["securityContext"]["fsGroup"] == IMAGE_UID

    # Time to drain: NOT_SERVING grace, then publishing and uploading.
    assert spec["terminationGracePeriodSeconds"] * 1000 >= cfg["shutdown_timeout_ms"] + cfg["not_serving_grace_ms"]
    # Memory: the limit covers mboxd's bound for these settings.
    assert quantity(mboxd["resources"]["limits"]["memory"]) >= cfg["memory_bound_bytes"]

    if overlay == "sidecar":
        # A native sidecar, started before the trainer, which logs to it on localhost.
        assert mboxd in spec["initContainers"] and mboxd["restartPolicy"] == "Always"
        trainer = next(c for c in spec["containers"] if c["name"] == "trainer")
        env = {e["name"]: e.get("value") for e in trainer["env"]}
        assert env["MBOX_ADDR"] == cfg["listen"]
        assert cfg["auth"]["allow_unauthenticated_loopback"] is True, "the trainer sends no token"
        assert cfg["storage_root"].startswith("s3://")
        assert any(e.get("secretRef", {}).get("name") == "mboxd-s3" for e in mboxd["envFrom"])
    else:
        deployment = find(docs, "Deployment")[0]
        if overlay == "reader":
            # Readers hold nothing: several at once, replaced without a gap, over
            # the bucket the sidecars publish to.
            assert cfg["role"] == "reader"
            assert deployment["spec"]["replicas"] >= 2
            assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
            assert cfg["storage_root"] == "s3://ml-tracking/runs"
            assert 0 < cfg["reader_poll_interval_ms"] <= 2000
            assert any(e.get("secretRef", {}).get("name") == "mboxd-s3" for e in mboxd["envFrom"])
            # Never selected by a Service meant for writers.
            assert template["metadata"]["labels"]["app.kubernetes.io/name"] != "mboxd"
        else:
            assert cfg["role"] == "writer"
            assert deployment["spec"]["strategy"]["type"] == "Recreate", "one writer per volume"
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items()
        service = find(docs, "Service")[0]
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        service_ports = {p["name"]: p for p in service["spec"]["ports"]}
        for name, number in ports.items():
            assert service_ports[name]["port"] == number
            assert service_ports[name]["targetPort"] == name
        if overlay == "reader":
            pass
        elif overlay == "s3":
            assert cfg["storage_root"] == "s3://ml-tracking/runs"
            assert any(e.get("secretRef", {}).get("name") == "mboxd-s3" for e in mboxd["envFrom"])
        else:
            assert cfg["storage_root"] == "", "standalone stores on its volume"
        if overlay == "servicemonitor":
            monitor = find(docs, "ServiceMonitor")[0]
            assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
            assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
            (endpoint,) = monitor["spec"]["endpoints"]
            assert endpoint["port"] in service_ports and service_ports[endpoint["port"]]["port"] == port_of(cfg["metrics_listen"])
            assert endpoint["path"] == "/metrics"
            assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["ca"]["secret"]["name"] == "mboxd-tls"
