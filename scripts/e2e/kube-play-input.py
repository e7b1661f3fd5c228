"""Turn deploy/kubernetes/ into the input of `podman kube play` (podman 4.3, Debian bookworm).

Run by `make k8s-e2e` on the very files `kubectl apply -k` applies; it changes only what
podman 4.3 cannot play, each step named here (docs/kubernetes.md, "Without a cluster"):

1. StatefulSet -> PersistentVolumeClaim(s) + the same pod: podman 4.3 plays Pods,
   Deployments, PVCs and ConfigMaps only. The claim is named as Kubernetes names it for
   ordinal 0 (``data-mosquitto-0``).
2. Service -> a pod name. podman has no Services, but its network resolves pod names:
   a workload that a (non-headless) Service selects is played as one Pod named after
   that Service, so ``mosquitto`` and ``postgres`` resolve as they do in the cluster.
   Other Deployments stay Deployments (podman names their pods NAME-pod-0, -1, ...).
3. Secret -> ConfigMap, secret volumes and secretKeyRef -> configMap ones: podman 4.3
   crashes on a secret volume without a podman secret store. Values must be UTF-8.
4. Namespace, NetworkPolicy: dropped (one host, one network).
5. The kustomization's ``images:`` are applied; ``--publish WORKLOAD:PORT=HOSTPORT``
   binds a container port on the host's loopback (a Service's job in the cluster) and
   the other container ports are left out (podman 4.3 would publish each on the
   host's 0.0.0.0); ``--secrets FILE`` stands for the kustomization's secrets/ entries.
6. Probes are left out: podman 4.3 runs them as curl (not in the images) from systemd
   timers (none here); the e2e asks the same endpoints itself.

    python3 scripts/e2e/kube-play-input.py deploy/kubernetes --secrets S.yaml \\
        --publish mosquitto:1884=41884 -o play.yaml
"""

from __future__ import annotations

import argparse
import base64
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]
DROPPED = {"Namespace", "NetworkPolicy", "Service"}
PLAYED = {"Pod", "Deployment", "PersistentVolumeClaim", "ConfigMap"}


def fail(message: str) -> None:
    raise SystemExit(f"kube-play-input: {message}")


def load(folder: Path, secrets: Path | None) -> tuple[list[Doc], dict[str, Any]]:
    """The documents of every resource of folder/kustomization.yaml, in its order."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    files = [folder / r for r in kustomization.get("resources", [])]
    if secrets is not None:
        files = [f for f in files if f.parent.name != "secrets"] + [secrets]
    for path in files:
        if not path.is_file():
            fail(f"{path}: listed in {folder}/kustomization.yaml but missing")
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs, kustomization


def selected_by(services: list[Doc], labels: dict[str, str]) -> str | None:
    """The name of the first ClusterIP Service whose selector matches these labels."""
    for svc in services:
        spec = svc.get("spec", {})
        selector = spec.get("selector") or {}
        if spec.get("clusterIP") == "None" or not selector:
            continue
        if all(labels.get(k) == v for k, v in selector.items()):
            return str(svc["metadata"]["name"])
    return None


def as_configmap(secret: Doc) -> Doc:
    data: dict[str, str] = {}
    name = secret["metadata"]["name"]
    for key, value in (secret.get("data") or {}).items():
        try:
            data[key] = base64.b64decode(value or "").decode("utf-8")
        except UnicodeDecodeError:
            fail(f"Secret {name}: data.{key} is not UTF-8; a ConfigMap's data cannot hold it")
    data.update(secret.get("stringData") or {})
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def rewrite_pod_spec(
    spec: Doc, images: dict[str, tuple[str, str | None]], publish: dict[int, int]
) -> None:
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            src = volume.pop("secret")
            volume["configMap"] = {"name": src["secretName"]}
            if "items" in src:
                volume["configMap"]["items"] = src["items"]
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        repo, _, tag = container["image"].rpartition(":")
        if repo in images:
            new_name, new_tag = images[repo]
            container["image"] = f"{new_name}:{new_tag or tag}"
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).pop("secretKeyRef", None)
            if ref is not None:
                env["valueFrom"]["configMapKeyRef"] = ref
        # podman 4.3 publishes every containerPort on the host's 0.0.0.0 (podman 5 no
        # longer does): only the ports asked for stay, bound to loopback.
        ports = []
        for port in container.get("ports", []):
            host_port = publish.pop(int(port["containerPort"]), None)
            if host_port is not None:
                ports.append({**port, "hostIP": "127.0.0.1", "hostPort": host_port})
        if ports:
            container["ports"] = ports
        else:
            container.pop("ports", None)
        # podman 4.3 turns probes into health checks run by curl (not in these images)
        # from systemd timers (not on this host): the e2e checks the same endpoints itself.
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            container.pop(probe, None)


def image_map(kustomization: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """The kustomization's images: name -> (newName, newTag or None: keep the tag)."""
    return {
        i["name"]: (i.get("newName", i["name"]), str(i["newTag"]) if "newTag" in i else None)
        for i in kustomization.get("images", [])
    }


def transform(docs: list[Doc], kustomization: dict[str, Any], publish: list[str]) -> list[Doc]:
    services = [d for d in docs if d["kind"] == "Service"]
    images = image_map(kustomization)
    wanted: dict[str, dict[int, int]] = {}
    for item in publish:
        try:
            workload, rest = item.split(":", 1)
            port, host_port = (int(p) for p in rest.split("=", 1))
        except ValueError:
            fail(f"--publish {item!r}: expected WORKLOAD:PORT=HOSTPORT")
        wanted.setdefault(workload, {})[port] = host_port
    out: list[Doc] = []
    for original in docs:
        kind, name = original["kind"], original["metadata"]["name"]
        doc = copy.deepcopy(original)
        doc["metadata"].pop("namespace", None)
        if kind in DROPPED:
            continue
        if kind == "Secret":
            out.append(as_configmap(doc))
            continue
        if kind not in {"StatefulSet", "Deployment"}:
            if kind not in PLAYED:
                fail(f"{kind} {name}: podman 4.3 cannot play it and there is no rule for it")
            out.append(doc)
            continue
        spec = doc["spec"]
        template = spec["template"]
        pod_spec = template["spec"]
        if kind == "StatefulSet":
            if spec.get("replicas", 1) != 1:
                fail(f"StatefulSet {name}: replicas {spec['replicas']}; only 1 is played")
            for claim in spec.get("volumeClaimTemplates", []):
                claim_name = f"{claim['metadata']['name']}-{name}-0"
                out.append(
                    {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "metadata": {"name": claim_name},
                        "spec": claim["spec"],
                    }
                )
                pod_spec.setdefault("volumes", []).append(
                    {
                        "name": claim["metadata"]["name"],
                        "persistentVolumeClaim": {"claimName": claim_name},
                    }
                )
        ports = wanted.pop(name, {})
        rewrite_pod_spec(pod_spec, images, ports)
        if ports:
            fail(f"--publish {name}: no container port {sorted(ports)} in {kind} {name}")
        service = selected_by(services, template["metadata"].get("labels", {}))
        if service is not None:
            if spec.get("replicas", 1) != 1:
                fail(f"{kind} {name}: behind Service {service} with {spec['replicas']} replicas")
            meta = {"name": service, "labels": template["metadata"].get("labels", {})}
            if template["metadata"].get("annotations"):
                meta["annotations"] = template["metadata"]["annotations"]
            out.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec})
        else:
            out.append(
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": doc["metadata"],
                    "spec": spec,
                }
            )
    if wanted:
        fail(f"--publish: no workload named {', '.join(sorted(wanted))}")
    # ConfigMaps and claims first: a pod refers to them.
    order = {"ConfigMap": 0, "PersistentVolumeClaim": 1}
    return sorted(out, key=lambda d: order.get(d["kind"], 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the kustomization's folder")
    parser.add_argument("--secrets", type=Path, help="the Secrets file (mksecrets.sh --out)")
    parser.add_argument("--publish", action="append", default=[], metavar="WORKLOAD:PORT=HOSTPORT")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    docs, kustomization = load(args.folder, args.secrets)
    played = transform(docs, kustomization, args.publish)
    args.output.write_text(yaml.safe_dump_all(played, sort_keys=False))
    print(f"{args.output}: {', '.join(d['kind'] + '/' + d['metadata']['name'] for d in played)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
