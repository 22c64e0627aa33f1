#!/usr/bin/env bash
# Create Weft's CA and hand it to the cluster (docs/kubernetes.md):
#   - a root CA (kept here, offline) and an intermediate CA signed by it;
#   - Secret weft-system/weft-ca: the intermediate (ca.json, ca.pem,
#     ca-key.pem, token.key, bundle.pem), what `weft-ca serve` loads;
#   - ConfigMap weft-ca-bundle (key ca.pem: the root) in weft-system and in
#     every NAMESPACE given, which sidecars use to verify the CA.
#
# Usage: deploy/k8s/create-ca.sh [--trust-domain TD] [--dir DIR] [--print] [NAMESPACE...]
#   --trust-domain TD  SPIFFE trust domain (default cluster.local; must match mesh.toml
#                      and `weft inject --trust-domain`)
#   --dir DIR          where the CA files live (default ~/.local/share/weft/ca, outside
#                      any repository); existing ones are reused, so run it again to add
#                      namespaces
#   --print            print the Secret and ConfigMaps as YAML instead of applying them
#                      (e.g. to seal them for GitOps); needs no cluster
# Needs `weft-ca` (or $WEFT_CA) and `kubectl`.
set -euo pipefail

td=cluster.local
dir=
print=false
namespaces=()
while [ $# -gt 0 ]; do
  case "$1" in
    --trust-domain) td="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --print) print=true; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "create-ca.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) namespaces+=("$1"); shift ;;
  esac
done
if [ -z "$dir" ]; then
  dir="${XDG_DATA_HOME:-${HOME:?HOME is not set: pass --dir DIR}/.local/share}/weft/ca"
fi
weft_ca="${WEFT_CA:-weft-ca}"

umask 077
if [ ! -e "$dir/root/ca.json" ]; then
  "$weft_ca" init --dir "$dir/root" --trust-domain "$td" >&2
fi
if [ ! -e "$dir/ca/ca.json" ]; then
  "$weft_ca" intermediate --root-dir "$dir/root" --dir "$dir/ca" >&2
fi

# Objects as YAML, built offline by kubectl.
manifests() {
  kubectl create secret generic weft-ca --namespace weft-system \
    --from-file="$dir/ca" --dry-run=client -o yaml
  for ns in weft-system "${namespaces[@]}"; do
    echo "---"
    kubectl create configmap weft-ca-bundle --namespace "$ns" \
      --from-file=ca.pem="$dir/ca/bundle.pem" --dry-run=client -o yaml
  done
}

if $print; then
  manifests
  exit 0
fi
for ns in weft-system "${namespaces[@]}"; do
  kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -
done
manifests | kubectl apply -f -
cat >&2 <<MSG
Done. The root CA's key is in $dir/root: move it off this machine (it is only
needed to make a new intermediate). $dir/ca is now in the Secret weft-system/weft-ca;
delete the local copy once you have a backup. Next: kubectl apply -k deploy/k8s/overlays/demo
MSG
