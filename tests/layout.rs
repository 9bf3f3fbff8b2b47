//! The code's shape, checked: modules depend on each other one way only (no import cycles),
//! so a module can be read, tested and changed with what it uses below it. Every `crate::`
//! path in `src/` (tests included) is resolved to the module that defines it, and the graph
//! of those references must have no cycle. A parent using its own child is not a reference.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`crate::proxy::inbound`) -> its source, comment lines dropped.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
                continue;
            }
            let rel = path
                .strip_prefix(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))
                .unwrap();
            let rel = rel.to_string_lossy().trim_end_matches(".rs").to_string();
            if rel == "main" || path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let module = match rel.as_str() {
                "lib" => "crate".to_string(),
                r => format!("crate::{}", r.replace('/', "::")),
            };
            let text = std::fs::read_to_string(&path).unwrap();
            let code: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect();
            out.insert(module, code.join("\n"));
        }
    }
    let mut out = BTreeMap::new();
    walk(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        &mut out,
    );
    out
}

/// Every `crate::a::b` path in `code`, with `crate::a::{b, c::d}` expanded.
fn paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let base = rest[..end].trim_end_matches(':').to_string();
        if rest[end..].starts_with('{') {
            let mut depth = 0;
            let close = rest[end..]
                .find(|c| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(rest.len(), |i| end + i);
            for item in rest[end + 1..close].split(',') {
                let item = item.split_whitespace().next().unwrap_or("");
                let item = item.trim_start_matches("self").trim_matches(':');
                found.push(match item {
                    "" => base.clone(),
                    i => format!("{base}::{i}"),
                });
            }
        } else {
            found.push(base);
        }
        rest = &rest[end.max(1)..];
    }
    found
}

#[test]
fn modules_depend_on_each_other_one_way_only() {
    let modules = modules();
    assert!(modules.len() > 20, "found only {} modules", modules.len());
    let resolve = |path: &str| {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len())
            .rev()
            .map(|n| parts[..n].join("::"))
            .find(|m| modules.contains_key(m))
    };
    let mut edges: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (module, code) in &modules {
        for path in paths(code) {
            let Some(target) = resolve(&path) else {
                continue;
            };
            let is_child = target.starts_with(&format!("{module}::"));
            if &target != module && !is_child {
                edges.entry(module).or_default().insert(target);
            }
        }
    }
    // A cycle is a path from a module back to itself.
    for start in modules.keys() {
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, trail)) = stack.pop() {
            for next in edges.get(at.as_str()).into_iter().flatten() {
                assert!(
                    next != start,
                    "import cycle: {} -> {start}",
                    trail.join(" -> ")
                );
                if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
}

#[test]
fn the_path_finder_sees_grouped_and_nested_imports() {
    let code = "use crate::proxy::{socket, relay::Abortable};\nlet x = crate::tls::handshake(y);";
    assert_eq!(
        paths(code),
        [
            "crate::proxy::socket",
            "crate::proxy::relay::Abortable",
            "crate::tls::handshake"
        ]
    );
}

/// Live state does not know the data path, and the data path does not know the Kubernetes
/// API: `state/` publishes snapshots that `proxy/` reads, and what the API says reaches the
/// data path only through `state/` (issue 27). Either import would bring a cycle back.
#[test]
fn live_state_and_the_data_path_keep_their_distance() {
    let modules = modules();
    assert!(modules.contains_key("crate::state::credentials"));
    let forbidden = [
        ("crate::state", "crate::proxy"),
        ("crate::proxy", "crate::kube"),
    ];
    for (module, code) in &modules {
        for (from, to) in forbidden {
            let inside = module == from || module.starts_with(&format!("{from}::"));
            if !inside {
                continue;
            }
            for path in paths(code) {
                assert!(
                    path != to && !path.starts_with(&format!("{to}::")),
                    "{module} uses {path}: {from} must not import {to}"
                );
            }
        }
    }
}
