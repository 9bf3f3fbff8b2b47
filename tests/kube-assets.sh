#!/usr/bin/env bash
# Prints the directory of a kube-apiserver and etcd for the Kubernetes API tests, the way the
# ecosystem's envtest takes them (KUBEBUILDER_ASSETS: a folder holding `kube-apiserver` and
# `etcd`). In order: KUBEBUILDER_ASSETS if set; else the archive in ../shared/kube/ beside this
# repository (checked against its SHA-256 and unpacked once into target/kube-assets); else
# nothing, and the tests skip loudly (or fail with L4MESH_REQUIRE_PRIVILEGED=1).
# Users bring their own with envtest's `setup-envtest use -p path`, or any kube-apiserver and
# etcd binaries put in one folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
    echo "$KUBEBUILDER_ASSETS"
    exit 0
fi
name=kube-apiserver-v1.36.2.tar.xz
sha=59f95940ade8cfa3a4b68ea9a7d46a93869d591b565de46ed22ee85aaae23881
archive="$root/../shared/kube/$name"
# A clone made elsewhere of a local checkout (CI's fresh clone) finds it beside its origin.
origin=$(git -C "$root" config --get remote.origin.url 2>/dev/null || true)
if [ ! -f "$archive" ] && [ -n "$origin" ] && [ -d "$origin" ]; then
    archive="$origin/../shared/kube/$name"
fi
[ -f "$archive" ] || exit 0
target=$(cd "$root" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null \
    || echo "$root/target")
out="$target/kube-assets"
if [ ! -x "$out/kube-apiserver" ] || [ ! -x "$out/etcd" ] || [ "$(cat "$out/.sha256" 2>/dev/null)" != "$sha" ]; then
    echo "$sha  $archive" | sha256sum -c --quiet - >&2 || { echo "kube-assets: $archive: wrong SHA-256" >&2; exit 1; }
    rm -rf "$out" && mkdir -p "$out"
    tar -xJf "$archive" -C "$out"
    echo "$sha" > "$out/.sha256"
    echo "kube-assets: unpacked kube-apiserver and etcd into $out" >&2
fi
echo "$out"
