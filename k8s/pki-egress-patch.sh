#!/usr/bin/env bash
# Prints a kustomize patch that narrows the pki Job's egress from "any address on 443/6443/8443"
# to the API server's own addresses and port, read from the cluster you are connected to.
# Read-only: it runs `kubectl get` and nothing else. Usage:
#   k8s/pki-egress-patch.sh > apiserver-egress.yaml
# then, in your overlay:
#   patches:
#     - target: {group: networking.k8s.io, kind: NetworkPolicy, name: pki}
#       path: apiserver-egress.yaml
#
# Why the endpoints and not the Service: most network plugins check egress after the kubernetes
# Service's ClusterIP:443 has been translated to an API server address and port, so those are
# what the rule must allow. Re-run it when the control plane's addresses change (upgrades,
# HA changes, a managed control plane moving).
set -euo pipefail
selector=kubernetes.io/service-name=kubernetes
addresses=$(kubectl get endpointslices -n default -l "$selector" \
    -o jsonpath='{range .items[*].endpoints[*]}{.addresses[0]}{"\n"}{end}' | sort -u)
port=$(kubectl get endpointslices -n default -l "$selector" -o jsonpath='{.items[0].ports[0].port}')
[ -n "$addresses" ] && [ -n "$port" ] || { echo "no endpoints for default/kubernetes" >&2; exit 1; }
cat <<YAML
# The pki Job may reach the API server's addresses on its port, and nothing else (DNS stays
# allowed by the dns policy). Made by k8s/pki-egress-patch.sh from the EndpointSlices of default/kubernetes.
- op: replace
  path: /spec/egress
  value:
    - to:
YAML
for a in $addresses; do
    case $a in *:*) cidr="$a/128" ;; *) cidr="$a/32" ;; esac
    printf '        - ipBlock:\n            cidr: %s\n' "$cidr"
done
cat <<YAML
      ports:
        - protocol: TCP
          port: $port
YAML
