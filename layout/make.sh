#!/usr/bin/env bash
# Makes layout/l4mesh.order again (why and when: layout/README.md). As root, with valgrind
# and a kube-apiserver (KUBEBUILDER_ASSETS, or ../shared/kube/ as tests/kube-assets.sh finds it).
# The list must name the symbols of the binary `cargo build --release` links, so that binary
# is built first and profiled; `cargo bench` only builds and runs the driver.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
mkdir -p target/layout
cp target/release/l4mesh target/layout/l4mesh
# The Kubernetes runs need a kube-apiserver and etcd, found as the tests find them.
KUBEBUILDER_ASSETS=$(bash tests/kube-assets.sh)
export KUBEBUILDER_ASSETS
L4MESH_LAYOUT_BIN=$PWD/target/layout/l4mesh cargo bench --bench layout
# Link the release binary again, now with the new list (build.rs watches it).
cargo build --release
