#!/usr/bin/env bash
# Static checks of the Kubernetes manifests, as CI runs them: every kustomization rendered,
# validated for the oldest and newest Kubernetes we support (kubernetes-validate --strict; it
# warns about the cert-manager and Prometheus Operator kinds, which it has no schema for), then
# scanned by checkov.
# Needs kubectl, kubernetes-validate and checkov (python3 -m pip install kubernetes-validate
# checkov). Findings are fixed or skipped on the object itself (checkov.io/skipN annotations,
# each with its reason), never in a config file.
set -euo pipefail
cd "$(dirname "$0")/.."

dirs=(k8s k8s/overlays/cert-manager k8s/overlays/autoscaling k8s/overlays/monitoring k8s/overlays/https k8s/overlays/gitops k8s/jobs)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for dir in "${dirs[@]}"; do
    rendered="$out/${dir//\//_}.yaml"
    kubectl kustomize "$dir" >"$rendered"
    for version in 1.30.0 1.37.0; do
        echo "kubernetes-validate $version: $dir"
        kubernetes-validate --strict --quiet -k "$version" "$rendered"
    done
done

# k8s/pki-egress-patch.sh against a stand-in kubectl (a two-node control plane on 6443): its
# patch must render and validate in an overlay.
stub="$out/stub"
mkdir -p "$stub" "$out/narrowed"
cat >"$stub/kubectl" <<'STUB'
#!/bin/sh
case "$*" in
    *ports*) echo 6443 ;;
    *) printf '192.0.2.10\n192.0.2.11\n' ;;
esac
STUB
chmod +x "$stub/kubectl"
PATH="$stub:$PATH" bash k8s/pki-egress-patch.sh >"$out/narrowed/apiserver-egress.yaml"
cp -R k8s/base "$out/narrowed/base"
cat >"$out/narrowed/kustomization.yaml" <<'YAML'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: bookstore
resources: [base]
patches:
  - target: {group: networking.k8s.io, kind: NetworkPolicy, name: pki}
    path: apiserver-egress.yaml
YAML
kubectl kustomize "$out/narrowed" >"$out/narrowed.yaml"
kubernetes-validate --strict --quiet -k 1.37.0 "$out/narrowed.yaml"
python3 - "$out/narrowed.yaml" <<'PY'
import sys, yaml
pki = next(d for d in yaml.safe_load_all(open(sys.argv[1]))
           if d and d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "pki")
cidrs = [t["ipBlock"]["cidr"] for rule in pki["spec"]["egress"] for t in rule.get("to", [])]
ports = [p["port"] for rule in pki["spec"]["egress"] for p in rule["ports"]]
assert cidrs == ["192.0.2.10/32", "192.0.2.11/32"] and ports == [6443], (cidrs, ports)
print("pki-egress-patch.sh: the pki Job narrowed to 192.0.2.10-11:6443")
PY
rm -f "$out/narrowed.yaml"

# Labels: every object carries the four app.kubernetes.io labels (name, component, part-of,
# managed-by), and every Secret cert-manager
# writes gets them too (secretTemplate).
python3 - "$out"/*.yaml <<'PY'
import sys, yaml
wanted = {"app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of",
          "app.kubernetes.io/managed-by"}
problems = []
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        name = f"{path.rsplit('/', 1)[-1]}: {doc['kind']}/{doc['metadata']['name']}"
        missing = wanted - set(doc["metadata"].get("labels", {}))
        if missing:
            problems.append(f"{name} lacks {sorted(missing)}")
        if doc["kind"] == "Certificate":
            template = doc["spec"].get("secretTemplate", {}).get("labels", {})
            if wanted - set(template):
                problems.append(f"{name}: its Secret lacks {sorted(wanted - set(template))}")
if problems:
    sys.exit("\n".join(problems))
print("labels: every object, and every Secret cert-manager writes")
PY

for dir in "${dirs[@]}"; do
    files=(-f "$out/${dir//\//_}.yaml")
    # The load Job runs in the stack's namespace, under a NetworkPolicy kept in the base: scanned
    # alone, it would look unpoliced (CKV2_K8S_6).
    [ "$dir" = k8s/jobs ] && files+=(-f "$out/k8s.yaml")
    echo "checkov: $dir"
    # --skip-download: no calls to the vendor's platform (they fail offline, noisily).
    checkov "${files[@]}" --framework kubernetes --quiet --compact --skip-download
done
echo "k8s checks passed"
