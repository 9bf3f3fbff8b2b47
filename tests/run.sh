#!/usr/bin/env bash
# The whole test suite, end-to-end tests included, from a fresh machine: installs what the
# tests need (Debian/Ubuntu packages and one pip package; idempotent, quick when present), then
# runs `cargo test` with the privileged tests required, not skipped. Run as root (with or
# without sudo):   tests/run.sh   (extra arguments go to cargo test)
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "tests/run.sh: run as root (the end-to-end tests build network namespaces)" >&2; exit 1; }

# tool -> Debian package
declare -A PKG=(
    [ip]=iproute2 [iptables-restore]=iptables [ip6tables-restore]=iptables
    [tcpdump]=tcpdump [setpriv]=util-linux [openssl]=openssl [curl]=curl
    [prometheus]=prometheus [promtool]=prometheus [python3]=python3
)
missing=()
for tool in "${!PKG[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${PKG[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || {
        echo "tests/run.sh: missing $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')and no apt-get to install them" >&2
        exit 1
    }
    echo "tests/run.sh: installing $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "tests/run.sh: installing kubernetes-validate (offline Kubernetes schema validation)"
    python3 -m pip install --quiet kubernetes-validate
fi

# A real kube-apiserver and etcd for the Kubernetes API tests (KUBEBUILDER_ASSETS, as envtest
# takes them): the one given, else the archive in ../shared/kube/, unpacked once.
KUBEBUILDER_ASSETS=$(bash tests/kube-assets.sh)
export KUBEBUILDER_ASSETS
[ -n "$KUBEBUILDER_ASSETS" ] || echo "tests/run.sh: no kube-apiserver found (set KUBEBUILDER_ASSETS); the Kubernetes API tests will fail" >&2

export L4MESH_REQUIRE_PRIVILEGED=1
exec cargo test "$@"
