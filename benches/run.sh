#!/usr/bin/env bash
# The whole comparison in one command, as root: installs the peers it compares against
# (Debian's stunnel4, haproxy, socat, iperf3) if missing, runs the criterion microbenches,
# then the side-by-side run, which writes its tables into benches/RESULTS.md.
# Takes about 30 minutes on 2 cores (a release build of l4mesh, then the benches).
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A PKG=(
    [stunnel4]=stunnel4 [haproxy]=haproxy [socat]=socat [iperf3]=iperf3
    [ip]=iproute2 [iptables-restore]=iptables [ip6tables-restore]=iptables
    [setpriv]=util-linux [openssl]=openssl [tcpdump]=tcpdump [curl]=curl
    [prometheus]=prometheus [promtool]=prometheus
)
missing=()
for tool in "${!PKG[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${PKG[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
# Debian starts the packaged daemons; the bench runs its own copies in its own namespaces.
for svc in haproxy stunnel4 iperf3; do
    systemctl stop "$svc" >/dev/null 2>&1 || true
done

# The side-by-side run measures the binary users run (`cargo build --release`, with its
# start-up layout), not the one `cargo bench` builds with the dev-dependencies' features; a
# copy, since `cargo bench` writes the same target/release/l4mesh.
cargo build --release --bin l4mesh
mkdir -p target/bench-bin
cp target/release/l4mesh target/bench-bin/l4mesh
export L4MESH_BENCH_BIN="$PWD/target/bench-bin/l4mesh"

cargo bench --bench sniff --bench authz --bench relay --bench handshake
# A missing peer or no root would make compare skip quietly: here that is a failure.
export L4MESH_REQUIRE_PRIVILEGED=1
cargo bench --bench compare
