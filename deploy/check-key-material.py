#!/usr/bin/env python3
"""What key material each container is given, and how each is hardened, read from the
rendered deployment rather than from its source:

  docker compose --profile load config --format json | deploy/check-key-material.py compose
  kubectl kustomize k8s | deploy/check-key-material.py k8s

compose: each service mounts exactly the volumes it needs (the CA's key, in `pki`, only in the
one-shot certs step), read-only where it only reads; every service is read-only, drops every
capability, cannot gain privileges, has memory and process limits and rotated logs; the two
services restart.

k8s: each pod mounts only its own Secret (no pod mounts a Secret holding a CA key, such as the
cert-manager overlay's `bookstore-ca`); only the PKI Job gets an API token; no Secret in the
manifests carries a CA key.

Prints what it checked; exits 1 with every problem found.
"""

import json
import os
import sys

COMPOSE_VOLUMES = {
    "certs": {"pki": False, "recommendations-certs": False, "marketplace-certs": False},
    "recommendations": {"recommendations-certs": True},
    "marketplace": {"marketplace-certs": True},
    "loadgen-web": {},
    "loadgen-grpc": {"marketplace-certs": True},
    "prometheus": {"prometheus-data": False},
    "grafana": {"grafana-data": False},
    "jaeger": {},
}
# Configuration files the observability services read, bound read-only from these folders.
CONFIG_FOLDERS = ("deploy/observability/", "k8s/components/monitoring/")
RESTARTING = {"recommendations", "marketplace"}

K8S_SECRETS = {
    "recommendations": {"recommendations-tls"},
    "marketplace": {"marketplace-tls"},
    "pki": set(),
    "loadgen": set(),
}
K8S_TOKEN = {"pki"}
CA_KEY_SECRETS = {"bookstore-ca"}


def check_compose(config, problems):
    services = config["services"]
    unknown = set(services) - set(COMPOSE_VOLUMES)
    if unknown or not {"certs", "recommendations", "marketplace"} <= set(services):
        problems.append(f"services {sorted(services)}, expected some of {sorted(COMPOSE_VOLUMES)}")
    for name, service in sorted(services.items()):
        mounts = {}
        for volume in service.get("volumes", []):
            source = volume.get("source", "")
            if volume.get("type") == "bind":
                relative = os.path.relpath(source, os.getcwd())
                if not (volume.get("read_only") and relative.startswith(CONFIG_FOLDERS)):
                    problems.append(f"{name}: binds {source} (only read-only configuration)")
                continue
            if volume.get("type") != "volume":
                problems.append(f"{name}: mounts {volume.get('type')} {source}")
                continue
            mounts[source] = bool(volume.get("read_only"))
        want = COMPOSE_VOLUMES.get(name, {})
        if mounts != want:
            problems.append(f"{name}: mounts {mounts} (volume: read-only), expected {want}")
        if service.get("read_only") is not True:
            problems.append(f"{name}: root filesystem is writable")
        if "ALL" not in service.get("cap_drop", []):
            problems.append(f"{name}: capabilities not dropped")
        if "no-new-privileges:true" not in service.get("security_opt", []):
            problems.append(f"{name}: may gain privileges")
        if not service.get("mem_limit"):
            problems.append(f"{name}: no memory limit")
        if not service.get("pids_limit"):
            problems.append(f"{name}: no process limit")
        if not service.get("logging", {}).get("options", {}).get("max-size"):
            problems.append(f"{name}: its logs are not rotated (logging.options.max-size)")
        if name in RESTARTING and service.get("restart") != "unless-stopped":
            problems.append(f"{name}: restart {service.get('restart')!r}, not unless-stopped")
        print(f"compose {name}: volumes {sorted(mounts) or 'none'}; hardened")


def pod_specs(docs):
    for doc in docs:
        kind = doc.get("kind")
        if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield doc["metadata"]["name"], doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def check_k8s(docs, problems):
    for doc in docs:
        if doc.get("kind") == "Secret":
            data = {**doc.get("data", {}), **doc.get("stringData", {})}
            if "ca.key" in data or doc["metadata"]["name"] in CA_KEY_SECRETS:
                problems.append(f"Secret {doc['metadata']['name']} carries a CA key")
    seen = set()
    for name, spec in pod_specs(docs):
        seen.add(name)
        secrets = set()
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                secrets.add(volume["secret"]["secretName"])
            for source in volume.get("projected", {}).get("sources", []):
                if "secret" in source:
                    secrets.add(source["secret"]["name"])
        if secrets & CA_KEY_SECRETS:
            problems.append(f"{name}: mounts a CA key ({sorted(secrets & CA_KEY_SECRETS)})")
        want = K8S_SECRETS.get(name)
        if want is None:
            problems.append(f"{name}: a pod this check does not know")
        elif secrets != want:
            problems.append(f"{name}: mounts Secrets {sorted(secrets)}, expected {sorted(want)}")
        token = spec.get("automountServiceAccountToken", True)
        if token != (name in K8S_TOKEN):
            problems.append(f"{name}: automountServiceAccountToken is {token}")
        print(f"k8s {name}: Secrets {sorted(secrets) or 'none'}; API token {token}")
    for name in ("recommendations", "marketplace"):
        if name not in seen:
            problems.append(f"no {name} pod in the manifests")


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("compose", "k8s"):
        sys.exit(__doc__)
    problems = []
    if sys.argv[1] == "compose":
        check_compose(json.load(sys.stdin), problems)
    else:
        import yaml  # PyYAML comes with kubernetes-validate

        check_k8s([d for d in yaml.safe_load_all(sys.stdin) if d], problems)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
