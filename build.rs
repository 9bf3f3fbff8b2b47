//! Build step, before any connection exists: lays out the sidecar's machine code so that the
//! functions a sidecar runs sit next to each other in the binary.
//!
//! Why: the kernel maps a program's code in 64 KiB runs around each page it first touches
//! ("fault-around"), or a whole page-cache folio (runs of 128-640 KiB seen here), so a fresh
//! sidecar's RSS is set less by how much code it runs (about 1.1 MiB) than by how widely that
//! code is spread over the 12 MiB of text (96 runs of 64 KiB, ~6 MiB resident).
//! `layout/l4mesh.order` lists the functions a sidecar runs at start and on its data paths,
//! first; the linker places them in that order (benches/RESULTS.md, issue 26;
//! `layout/README.md` says how the list is made again).
//!
//! Only for release builds linked by LLD (Rust's default linker on x86_64 Linux since 1.90);
//! `L4MESH_NO_LAYOUT=1` turns it off. A name the list has and the binary does not (code that
//! changed since the list was made) is skipped: the layout only gets less tight.

use std::env;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=layout/l4mesh.order");
    println!("cargo::rerun-if-env-changed=L4MESH_NO_LAYOUT");
    println!("cargo::rerun-if-env-changed=RUSTC_LINKER");
    if env::var("PROFILE").as_deref() != Ok("release") || env::var_os("L4MESH_NO_LAYOUT").is_some()
    {
        return;
    }
    if !links_with_lld() {
        return;
    }
    let order = std::path::Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("layout/l4mesh.order");
    println!(
        "cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo::rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    // Not `-z pack-relative-relocs` (DT_RELR): another ~600 KiB less at start, measured, but
    // the binary then needs glibc 2.36+ where it runs, not only where it was built.
}

/// LLD is what rustc links x86_64 Linux binaries with from 1.90 on, unless the build names
/// another linker; GNU ld does not know `--symbol-ordering-file` and would fail the link.
fn links_with_lld() -> bool {
    if env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu")
        || env::var_os("RUSTC_LINKER").is_some()
    {
        return false;
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") {
        return false;
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    matches!(minor, Some(m) if m >= 90)
}
