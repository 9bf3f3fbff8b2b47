#!/usr/bin/env bash
# l4mesh local demo: two pods (network namespaces on a bridge), an unmodified HTTP server and
# client, first talking plaintext, then migrated to mutual TLS the way a platform team does it:
# sidecars in PERMISSIVE mode (mesh clients get mTLS, others still get through), then STRICT
# by editing the policy file, live. Neither application changes. A capture on the wire shows
# the difference. Everything lives in namespaces this script makes and is removed on exit, Ctrl-C
# or failure. Run as root (with or without sudo):   deploy/demo.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="l4demo$$"
NODE="$TAG-node"; CLIENT="$TAG-client"; SERVER="$TAG-server"; OUTSIDER="$TAG-outsider"
CLIENT_IP=198.18.0.1; SERVER_IP=198.18.0.2; OUTSIDER_IP=198.18.0.3
MARKER="SECRET-PLAINTEXT-MARKER"
WORK=""
PIDS=()

say()  { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   %s\n' "$*"; }
die()  { printf 'demo: %s\n' "$*" >&2; exit 1; }

# --- prerequisites: installed here when missing (Debian/Ubuntu) ---------------------------
[ "$(id -u)" = 0 ] || die "run as root (e.g. sudo $0): the demo makes network namespaces"
declare -A PKG=(
    [ip]=iproute2 [iptables-restore]=iptables [ip6tables-restore]=iptables [tcpdump]=tcpdump
    [setpriv]=util-linux [curl]=curl [python3]=python3
)
missing=()
for tool in "${!PKG[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${PKG[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
    command -v apt-get >/dev/null 2>&1 || die "missing ${pkgs}and no apt-get to install them"
    say "installing what the demo needs: $pkgs"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null \
        || die "could not install $pkgs"
fi

cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    for ns in "$CLIENT" "$SERVER" "$OUTSIDER" "$NODE"; do ip netns del "$ns" 2>/dev/null; done
    [ -n "$WORK" ] && rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build ---------------------------------------------------------------------------------
BIN="${L4MESH_BIN:-}"
if [ -z "$BIN" ]; then
    say "building l4mesh (release)"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build failed"
    # Where cargo put it: target/, or CARGO_TARGET_DIR / build.target-dir when set.
    target=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
        | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    BIN="${target:-$ROOT/target}/release/l4mesh"
fi
WORK="$(mktemp -d /tmp/l4mesh-demo.XXXXXX)"
chmod 755 "$WORK"
# The sidecars run as UID 1337, which may not be able to reach a binary under /root.
install -m 755 "$BIN" "$WORK/l4mesh"
BIN="$WORK/l4mesh"

# --- the pods ------------------------------------------------------------------------------
say "making three pods: client $CLIENT_IP, server $SERVER_IP, outsider $OUTSIDER_IP (no sidecar)"
ip netns add "$NODE"
ip -n "$NODE" link add br0 type bridge
ip -n "$NODE" link set br0 up
i=0
for pod in "$CLIENT:$CLIENT_IP" "$SERVER:$SERVER_IP" "$OUTSIDER:$OUTSIDER_IP"; do
    ns="${pod%%:*}"; addr="${pod##*:}"
    ip netns add "$ns"
    ip -n "$NODE" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$NODE" link set "v$i" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    i=$((i + 1))
done

mkdir -p "$WORK/site"
echo "hello from the server pod: $MARKER" > "$WORK/site/index.html"
ip netns exec "$SERVER" python3 -m http.server 8080 --bind "$SERVER_IP" --directory "$WORK/site" \
    >"$WORK/http.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do
    ip netns exec "$SERVER" bash -c "exec 3<>/dev/tcp/$SERVER_IP/8080" 2>/dev/null && break
    sleep 0.1
done

# Captures on the server pod's interface, then reports what crossed the wire.
capture_start() {
    ip netns exec "$SERVER" tcpdump --immediate-mode -Z root -i eth0 -n -s 0 -U -w "$WORK/$1.pcap" \
        tcp port 8080 or tcp port 15008 >"$WORK/$1.tcpdump.log" 2>&1 &
    CAPTURE_PID=$!
    PIDS+=("$CAPTURE_PID")
    for _ in $(seq 50); do grep -q "listening on" "$WORK/$1.tcpdump.log" && break; sleep 0.1; done
}
capture_report() {
    sleep 0.3; kill -INT "$CAPTURE_PID"; wait "$CAPTURE_PID" 2>/dev/null || true
    local pcap="$WORK/$1.pcap" plain tls
    plain=$(LC_ALL=C grep -a -c "$MARKER" "$pcap" || true)
    tls=$( (LC_ALL=C grep -a -o -P '\x17\x03\x03' "$pcap" || true) | wc -l)
    note "on the wire: $(stat -c %s "$pcap") bytes captured, plaintext marker seen $plain time(s), TLS application-data records: $tls"
}

# --- before: plaintext ---------------------------------------------------------------------
say "before the mesh: the client fetches http://$SERVER_IP:8080/ in plaintext"
capture_start before
note "client got: $(ip netns exec "$CLIENT" curl -s --max-time 5 "http://$SERVER_IP:8080/")"
capture_report before
note "anyone on the path can read it."

# --- migrate: capture + sidecars -----------------------------------------------------------
say "migrating both pods to the mesh: certificates, capture rules, sidecars (UID 1337)"
"$BIN" certs ca --out "$WORK/ca" >/dev/null
"$BIN" certs issue --ca "$WORK/ca" --namespace shop --service-account frontend --out "$WORK/client" >/dev/null
"$BIN" certs issue --ca "$WORK/ca" --namespace shop --service-account backend --out "$WORK/server" >/dev/null
# The mesh's policy file (a ConfigMap in Kubernetes): no policies yet, which means PERMISSIVE.
# An empty file would be refused (it is what a failed write leaves); "none" is said explicitly.
printf 'apiVersion: v1\nkind: List\nitems: []\n' >"$WORK/policy.yaml"
chmod 644 "$WORK/policy.yaml"
for pod in client server; do
    chown -R 1337:1337 "$WORK/$pod"
    cat >"$WORK/$pod.yaml" <<YAML
identity:
  trust_domain: cluster.local
  cert_chain: $pod/cert-chain.pem
  private_key: $pod/key.pem
  trust_bundle: $pod/root-cert.pem
policy:
  file: policy.yaml
workload:
  ports: [8080]
  labels:
    app: $pod
# A destination found without a sidecar is reached in plaintext for this long before the tunnel
# is tried again (30s by default; short here so the demo need not wait).
outbound:
  unmeshed_ttl: 2s
YAML
done
start_sidecar() { # netns name
    ip netns exec "$1" "$BIN" iptables apply
    ip netns exec "$1" setpriv --reuid=1337 --regid=1337 --clear-groups \
        "$BIN" run --config "$WORK/$2.yaml" >"$WORK/$2.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do grep -q "l4mesh ready" "$WORK/$2.log" && return; sleep 0.1; done
    cat "$WORK/$2.log"; die "sidecar $2 did not start"
}
start_sidecar "$CLIENT" client
note "capture rules in the client pod (l4mesh iptables apply):"
ip netns exec "$CLIENT" iptables -t nat -S L4MESH_OUTPUT | sed 's/^/     /'

say "the client joined first: its server has no sidecar yet"
note "client got: $(ip netns exec "$CLIENT" curl -s --max-time 5 "http://$SERVER_IP:8080/")"
note "the server's port 15008 refused (no sidecar there), so the client's sidecar sent it as it"
note "was, and says so:"
sleep 0.2
ip netns exec "$CLIENT" curl -s http://127.0.0.1:15020/metrics \
    | grep '^l4mesh_outbound_plaintext_total' | sed 's/^/     client sidecar: /'

start_sidecar "$SERVER" server
sleep 2.2 # the client's un-meshed entry for the server expires (unmeshed_ttl)

say "after: the same unmodified client, the same URL"
capture_start after
note "client got: $(ip netns exec "$CLIENT" curl -s --max-time 5 "http://$SERVER_IP:8080/")"
capture_report after
note "only TLS records crossed, to the tunnel port 15008; the sidecars verified each other:"
sleep 0.2
grep -h -o 'outbound tunnel stream open.*' "$WORK/client.log" | head -1 | sed 's/^/     client sidecar: /'
grep -h -o 'tunnel stream accepted.*' "$WORK/server.log" | head -1 | sed 's/^/     server sidecar: /'

say "PERMISSIVE (no policy yet): a pod without a sidecar still gets through in plaintext"
note "outsider got: $(ip netns exec "$OUTSIDER" curl -s --max-time 5 "http://$SERVER_IP:8080/")"
sleep 0.2
grep -h -o 'inbound non-mesh connection forwarded.*' "$WORK/server.log" | head -1 | sed 's/^/     server sidecar: /'
note "so a workload can join the mesh before all of its clients have."

say "is the server ready for STRICT? l4mesh migration-report watches its sidecar for 2s"
( for _ in $(seq 15); do
      ip netns exec "$OUTSIDER" curl -s --max-time 1 "http://$SERVER_IP:8080/" >/dev/null
      ip netns exec "$CLIENT" curl -s --max-time 1 "http://$SERVER_IP:8080/" >/dev/null
      sleep 0.1
  done ) &
ip netns exec "$SERVER" "$BIN" migration-report --sidecar http://127.0.0.1:15000 --window 2s \
    | sed 's/^/     /'
wait $! 2>/dev/null || true
note "not yet: the outsider still speaks plaintext. Suppose the platform team accepts that and"
note "cuts it off (in real life: give it a sidecar first, and the report says safe)."

say "going STRICT: one PeerAuthentication in the policy file, picked up live"
cat >"$WORK/policy.yaml.new" <<'YAML'
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: shop
spec:
  mtls:
    mode: STRICT
YAML
chmod 644 "$WORK/policy.yaml.new"
mv "$WORK/policy.yaml.new" "$WORK/policy.yaml"
sed 's/^/     /' "$WORK/policy.yaml"
for _ in $(seq 50); do grep -q "policy reloaded" "$WORK/server.log" && break; sleep 0.1; done
grep -h -o 'policy reloaded.*' "$WORK/server.log" | head -1 | sed 's/^/     server sidecar: /'
if out=$(ip netns exec "$OUTSIDER" curl -s --max-time 5 "http://$SERVER_IP:8080/"); then
    note "UNEXPECTED: outsider got an answer: $out"; exit 1
fi
note "the outsider is refused now, and counted (what any client can cause is logged at debug only):"
sleep 0.2
ip netns exec "$SERVER" curl -s http://127.0.0.1:15020/metrics \
    | grep '^l4mesh_connections_total.*outcome="strict"' | sed 's/^/     server sidecar: /'
note "and the mesh client is still served: $(ip netns exec "$CLIENT" curl -s --max-time 5 "http://$SERVER_IP:8080/")"

say "done; tearing everything down"
