#!/usr/bin/env bash
# Makes layout/l4mesh.order again (why and when: layout/README.md). As root, with valgrind.
# The list must name the symbols of the binary `cargo build --release` links, so that binary
# is built first and profiled; `cargo bench` only builds and runs the driver.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
mkdir -p target/layout
cp target/release/l4mesh target/layout/l4mesh
L4MESH_LAYOUT_BIN=$PWD/target/layout/l4mesh cargo bench --bench layout
