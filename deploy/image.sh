#!/usr/bin/env bash
# Builds the image deploy/Dockerfile describes, without a container engine or an image
# registry, and prints its size layer by layer. For machines where `docker build` cannot run
# (ours: no Docker engine, no registry to pull debian:bookworm-slim from), and to state the
# image's size from a real build. Run as root from anywhere:
#
#   deploy/image.sh           build target/image/l4mesh-image.tar (an OCI archive), smoke-test it
#   deploy/image.sh --plan    print what it would build, read from the Dockerfile, and stop
#
# What it does, one step per Dockerfile instruction of the runtime stage:
#   FROM debian:<suite>-slim   debootstrap --variant=minbase <suite>, then made "slim" the way
#                              Debian's official images are (debuerreotype's recipe: no docs,
#                              man pages or locales, a dpkg config that keeps them out, apt
#                              caches and lists emptied, no logs)
#   RUN apt-get install ...    the same command, in a chroot of that root filesystem
#   COPY / RUN chmod           the binary built as the build stage builds it (same ENV), and
#                              iptables/init.sh
#   USER / ENTRYPOINT / CMD    the image's config
# Layers are diffed and packed by umoci; the archive loads with `podman load` or
# `skopeo copy oci-archive:target/image/l4mesh-image.tar docker-daemon:l4mesh:dev`.
# The smoke test runs, from the image's own root filesystem, `l4mesh --version` as UID 1337
# and the init container's entry point in a network namespace made for it (removed after).
# Needs debootstrap, umoci, skopeo, python3 and ip (installed with apt-get when missing), cargo,
# and network access to a Debian mirror (L4MESH_DEBIAN_MIRROR, default
# http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DOCKERFILE=deploy/Dockerfile
OUT=${L4MESH_IMAGE_DIR:-$ROOT/target/image}
MIRROR=${L4MESH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${L4MESH_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

say() { printf '\033[1m== %s\033[0m\n' "$*"; }
die() { printf 'deploy/image.sh: %s\n' "$*" >&2; exit 1; }

# --- the plan, read from the Dockerfile (one source of truth) ------------------------------
# The runtime stage is the last FROM; its base must be debian:<suite>-slim.
runtime=$(awk '/^FROM /{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' "$DOCKERFILE")
SUITE=$(sed -n 's/^FROM debian:\([a-z]*\)-slim.*/\1/p' <<<"$runtime")
[ -n "$SUITE" ] || die "$DOCKERFILE: the runtime stage is not FROM debian:<suite>-slim"
# The apt-get line's packages, up to the line continuation.
PACKAGES=$(sed -n 's/.*apt-get install -y --no-install-recommends \([^\\&]*\).*/\1/p' <<<"$runtime" | xargs)
[ -n "$PACKAGES" ] || die "$DOCKERFILE: no 'apt-get install -y --no-install-recommends' line in the runtime stage"
BUILD_ENV=$(sed -n 's/^ENV \(CARGO_.*\)/\1/p' "$DOCKERFILE" | xargs)
[ -n "$BUILD_ENV" ] || die "$DOCKERFILE: no ENV CARGO_... line in the build stage"
BUILD_CMD=$(sed -n 's/^RUN \(cargo build .*\)/\1/p' "$DOCKERFILE")
[ -n "$BUILD_CMD" ] || die "$DOCKERFILE: no 'RUN cargo build' line in the build stage"
# COPY lines: "<src> <dest>" pairs; --from=build copies the built binary.
COPIES=$(sed -n 's/^COPY \(--from=build \)\{0,1\}\([^ ]*\) \([^ ]*\)$/\2 \3/p' <<<"$runtime")
CHMODS=$(sed -n 's/^RUN chmod \([0-7]*\) \(.*\)/\1 \2/p' <<<"$runtime")
USER_SPEC=$(sed -n 's/^USER \(.*\)/\1/p' <<<"$runtime")
ENTRYPOINT=$(sed -n 's/^ENTRYPOINT \["\([^"]*\)"\]/\1/p' <<<"$runtime")
CMD=$(sed -n 's/^CMD \["\([^"]*\)"\]/\1/p' <<<"$runtime")
[ -n "$COPIES" ] && [ -n "$USER_SPEC" ] && [ -n "$ENTRYPOINT" ] && [ -n "$CMD" ] \
    || die "$DOCKERFILE: expected COPY, USER, ENTRYPOINT [\"..\"] and CMD [\"..\"] in the runtime stage"

plan() {
    echo "base: debian:$SUITE-slim (debootstrap --variant=minbase $SUITE, slimmed)"
    echo "packages: $PACKAGES"
    echo "binary: $BUILD_ENV $BUILD_CMD"
    while read -r src dest; do echo "copy: $src -> $dest"; done <<<"$COPIES"
    [ -z "$CHMODS" ] || while read -r mode path; do echo "chmod: $mode $path"; done <<<"$CHMODS"
    echo "user: $USER_SPEC"
    echo "entrypoint: $ENTRYPOINT"
    echo "cmd: $CMD"
}
if [ "${1:-}" = --plan ]; then plan; exit 0; fi
[ $# -eq 0 ] || die "usage: deploy/image.sh [--plan]"
[ "$(id -u)" = 0 ] || die "run as root (debootstrap and chroot need it)"
plan

# --- tools ---------------------------------------------------------------------------------
missing=()
for tool in debootstrap umoci skopeo python3; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "could not install ${missing[*]}"
fi

# --- the binary, as the build stage builds it ----------------------------------------------
say "building the binary: $BUILD_ENV $BUILD_CMD"
# Its own target directory: the stripped profile must not replace the benches' release build.
env $BUILD_ENV CARGO_TARGET_DIR="$OUT/cargo" $BUILD_CMD
BINARY=$OUT/cargo/release/l4mesh

# --- layers --------------------------------------------------------------------------------
LAYOUT=$OUT/oci
BUNDLE=$OUT/bundle
RFS=$BUNDLE/rootfs
IMAGE=$LAYOUT:l4mesh
MOUNTS=()
NETNS=""
cleanup() {
    local m
    for m in "${MOUNTS[@]}"; do umount -l "$m" 2>/dev/null || true; done
    [ -z "$NETNS" ] || ip netns del "$NETNS" 2>/dev/null || true
}
trap cleanup EXIT
mount_for_chroot() {
    mount -t proc proc "$RFS/proc" && MOUNTS+=("$RFS/proc")
    mount --bind /dev "$RFS/dev" && MOUNTS+=("$RFS/dev")
}
unmount_all() {
    local m
    for m in "${MOUNTS[@]}"; do umount -l "$m"; done
    MOUNTS=()
}
layer() { # layer <created_by>: packs what changed in the root filesystem since the last one
    umoci repack --image "$IMAGE" --history.created_by "$1" "$BUNDLE"
    rm -rf "$BUNDLE"
    umoci unpack --image "$IMAGE" "$BUNDLE" >/dev/null
}

rm -rf "$LAYOUT" "$BUNDLE" "$OUT/l4mesh-image.tar"
mkdir -p "$OUT"
umoci init --layout "$LAYOUT"
umoci new --image "$IMAGE"
umoci unpack --image "$IMAGE" "$BUNDLE" >/dev/null

say "FROM debian:$SUITE-slim: debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$RFS" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 \
    || { tail -20 "$OUT/debootstrap.log" >&2; die "debootstrap failed (log: $OUT/debootstrap.log)"; }
# The sources a Debian image carries: the release, its updates and security.
rm -f "$RFS/etc/apt/sources.list"
cat >"$RFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# Container conventions of Debian's images: services never start on install, apt keeps no
# caches of .deb files or package lists, no translations.
printf '#!/bin/sh\nexit 101\n' >"$RFS/usr/sbin/policy-rc.d"
chmod 0755 "$RFS/usr/sbin/policy-rc.d"
echo force-unsafe-io >"$RFS/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
clean='"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true";'
cat >"$RFS/etc/apt/apt.conf.d/docker-clean" <<EOF
DPkg::Post-Invoke { $clean };
APT::Update::Post-Invoke { $clean };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::GzipIndexes "true";' >"$RFS/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'Acquire::Languages "none";' >"$RFS/etc/apt/apt.conf.d/docker-no-languages"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$RFS/etc/apt/apt.conf.d/docker-autoremove-suggests"
# "slim": documentation, man pages and locales removed, and kept out of later installs (the
# image's own apt-get install) by dpkg path filters.
{
    echo '# slim: documentation, man pages and locales are not installed'
    for d in doc groff info linda lintian/overrides locale man; do echo "path-exclude /usr/share/$d/*"; done
    echo 'path-include /usr/share/doc/*/copyright'
    echo 'path-include /usr/share/locale/locale.alias'
} >"$RFS/etc/dpkg/dpkg.cfg.d/docker"
for d in doc groff info linda lintian/overrides locale man; do
    [ -d "$RFS/usr/share/$d" ] || continue
    find "$RFS/usr/share/$d" -mindepth 1 -not -type d \
        -not -path "$RFS/usr/share/doc/*/copyright" -not -path "$RFS/usr/share/locale/locale.alias" -delete
    find "$RFS/usr/share/$d" -mindepth 1 -depth -type d -empty -delete
done
rm -rf "$RFS"/var/cache/apt/* "$RFS"/var/lib/apt/lists/* "$RFS"/var/log/apt/*.log \
    "$RFS"/var/log/dpkg.log "$RFS"/var/log/bootstrap.log "$RFS"/var/log/alternatives.log \
    "$RFS"/var/cache/ldconfig/aux-cache "$RFS"/proc/* "$RFS"/sys/* "$RFS"/dev/*
# The engine provides these at run time.
: >"$RFS/etc/resolv.conf"
: >"$RFS/etc/hostname"
layer "debian:$SUITE-slim (debootstrap --variant=minbase $SUITE, slimmed as Debian's images are)"

say "RUN apt-get install -y --no-install-recommends $PACKAGES"
cp /etc/resolv.conf "$RFS/etc/resolv.conf"
mount_for_chroot
# shellcheck disable=SC2086
chroot "$RFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get update -qq && apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends $PACKAGES >/dev/null && rm -rf /var/lib/apt/lists/*"
unmount_all
: >"$RFS/etc/resolv.conf"
rm -f "$RFS"/var/log/apt/*.log "$RFS"/var/log/dpkg.log "$RFS"/var/log/alternatives.log
layer "RUN apt-get update && apt-get install -y --no-install-recommends $PACKAGES && rm -rf /var/lib/apt/lists/*"

while read -r src dest; do
    [ "$src" = /src/target/release/l4mesh ] && from=$BINARY || from=$ROOT/$src
    [ -e "$from" ] || die "COPY $src: $from does not exist"
    say "COPY $src $dest"
    mkdir -p "$RFS$(dirname "$dest")"
    cp "$from" "$RFS$dest"
    layer "COPY $src $dest"
done <<<"$COPIES"
[ -z "$CHMODS" ] || while read -r mode path; do
    say "RUN chmod $mode $path"
    chmod "$mode" "$RFS$path"
    layer "RUN chmod $mode $path"
done <<<"$CHMODS"

umoci config --image "$IMAGE" --config.user "$USER_SPEC" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.entrypoint "$ENTRYPOINT" --config.cmd "$CMD" --history.created_by "USER/ENTRYPOINT/CMD"
umoci gc --layout "$LAYOUT"
rm -rf "$BUNDLE"
umoci unpack --image "$IMAGE" "$BUNDLE" >/dev/null
tar -C "$LAYOUT" -cf "$OUT/l4mesh-image.tar" .

# --- smoke test: the image's own files do what the pod asks of them ------------------------
say "smoke test"
mount_for_chroot
chroot --userspec="$USER_SPEC" "$RFS" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin \
    "$ENTRYPOINT" --version
# The init container: capture rules installed in a network namespace of its own.
NETNS=l4mesh-image-$$
ip netns add "$NETNS"
ip netns exec "$NETNS" chroot "$RFS" /usr/bin/env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    l4mesh-iptables-init >/dev/null
rules=$(ip netns exec "$NETNS" chroot "$RFS" iptables-save -t nat | grep -c '^-A L4MESH' || true)
[ "$rules" -gt 0 ] || die "the init container's entry point installed no L4MESH rules"
echo "init container: $rules L4MESH nat rules installed by the image's iptables"
ip netns del "$NETNS"
NETNS=""
unmount_all
skopeo inspect "oci-archive:$OUT/l4mesh-image.tar" >/dev/null \
    || die "skopeo cannot read $OUT/l4mesh-image.tar"

# --- size ----------------------------------------------------------------------------------
say "size"
manifest=$(python3 - "$LAYOUT" <<'EOF'
import json, sys
layout = sys.argv[1]
index = json.load(open(f"{layout}/index.json"))
print(index["manifests"][0]["digest"].split(":")[1])
EOF
)
python3 - "$LAYOUT" "$manifest" <<'EOF'
import gzip, json, sys
layout, manifest = sys.argv[1], sys.argv[2]
blob = lambda d: f"{layout}/blobs/sha256/{d.split(':')[1]}"
m = json.load(open(blob("sha256:" + manifest)))
config = json.load(open(blob(m["config"]["digest"])))
steps = [h["created_by"] for h in config["history"] if not h.get("empty_layer")]
mb = lambda n: f"{n / 1e6:7.1f} MB"
total_c = total_u = 0
print(f"{'compressed':>10} {'unpacked':>10}  layer")
for layer, step in zip(m["layers"], steps):
    size_c = layer["size"]
    with gzip.open(blob(layer["digest"])) as f:
        size_u = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
    total_c += size_c
    total_u += size_u
    print(f"{mb(size_c)} {mb(size_u)}  {step[:90]}")
print(f"{mb(total_c)} {mb(total_u)}  total ({len(m['layers'])} layers): what a node pulls / what it stores")
EOF
echo "image: $OUT/l4mesh-image.tar ($(du -h "$OUT/l4mesh-image.tar" | cut -f1))"
