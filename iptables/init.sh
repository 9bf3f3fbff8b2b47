#!/bin/sh
# Entry point of the l4mesh init container: installs the capture rules in the pod's network
# namespace, then exits. Needs NET_ADMIN and NET_RAW, nothing else. Options come from the
# environment, which the injector sets from the pod's annotations; unset means the default.
#
#   L4MESH_INBOUND_PORTS           ports to capture inbound, comma-separated, or * (default *)
#   L4MESH_EXCLUDE_INBOUND_PORTS   inbound ports never captured (15000,15008,15020,15021 always are)
#   L4MESH_EXCLUDE_OUTBOUND_PORTS  outbound destination ports never captured
#   L4MESH_EXCLUDE_OUTBOUND_CIDRS  outbound destination networks never captured
#   L4MESH_PROXY_UID / _GID        the sidecar's UID/GID (default 1337)
#   L4MESH_IPV6                    true|false: also install ip6tables rules (default true)
#   L4MESH_BIN                     the l4mesh binary (default: l4mesh on PATH)
set -eu

set -- iptables apply \
    --proxy-uid "${L4MESH_PROXY_UID:-1337}" \
    --proxy-gid "${L4MESH_PROXY_GID:-1337}" \
    --inbound-ports "${L4MESH_INBOUND_PORTS:-*}" \
    --ipv6 "${L4MESH_IPV6:-true}"
[ -n "${L4MESH_EXCLUDE_INBOUND_PORTS:-}" ] && set -- "$@" --exclude-inbound-ports "$L4MESH_EXCLUDE_INBOUND_PORTS"
[ -n "${L4MESH_EXCLUDE_OUTBOUND_PORTS:-}" ] && set -- "$@" --exclude-outbound-ports "$L4MESH_EXCLUDE_OUTBOUND_PORTS"
[ -n "${L4MESH_EXCLUDE_OUTBOUND_CIDRS:-}" ] && set -- "$@" --exclude-outbound-cidrs "$L4MESH_EXCLUDE_OUTBOUND_CIDRS"

exec "${L4MESH_BIN:-l4mesh}" "$@"
