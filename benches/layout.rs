//! Makes `layout/l4mesh.order` again: the functions a sidecar runs, in the order the linker
//! should place them (`build.rs` hands the list to LLD; why: `layout/README.md`).
//!
//! Two sidecars (client and server pods, real capture) run under valgrind's callgrind, which
//! records every function executed, twice: stopped once ready (the functions of a start),
//! then stopped after the paths traffic takes: the tunnel (small and 1 MiB exchanges, several
//! at once), the direct transport, plaintext in (a pod without a sidecar calling a PERMISSIVE
//! server) and out (a meshed client calling a pod without a sidecar), a refused port, metrics
//! and admin scrapes. Each twice: without Kubernetes (a demo, a VM) and with it (a real
//! kube-apiserver, as in every cluster: `discovery.kubernetes: auto` turns it on wherever a
//! service-account token is mounted), where the traffic also goes through two Services'
//! ClusterIPs and a slice changes. The list: a start's functions, then what Kubernetes adds
//! to them; then what the traffic adds, then what Kubernetes traffic adds (why: `profile`).
//!
//!     layout/make.sh       # as root; needs valgrind (apt-get install valgrind) and
//!                          # KUBEBUILDER_ASSETS (tests/kube-assets.sh finds them)
//!
//! The list names functions by their mangled symbols, so it must be made from the binary
//! `cargo build --release` links: `cargo bench` builds `l4mesh` with the dev-dependencies'
//! features unified in, and the generic functions of those crates get other names.
//! `layout/make.sh` builds the release binary first and names it in `L4MESH_LAYOUT_BIN`.
//! Code that changes afterwards keeps most names (a symbol's hash comes from its path and
//! crate, not its body); a name that no longer exists is skipped by the linker.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::apiserver::{self, objects, ApiServer, SIDECAR_TOKEN};
use common::*;

const ECHO: u16 = 8080;
const DIRECT: u16 = 8081;
/// The Service the Kubernetes runs' traffic dials: its ClusterIP's port, in front of the
/// server pod's echo.
const SERVICE_PORT: u16 = 80;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // Root, ip, iptables and setpriv, as the end-to-end tests need them.
    if !privileged("bench layout") {
        return;
    }
    if !["valgrind", "nm"].iter().all(|t| installed(t)) {
        eprintln!(
            "bench layout: needs valgrind and nm (apt-get install valgrind binutils): not run"
        );
        return;
    }
    let Some(bin) = std::env::var_os("L4MESH_LAYOUT_BIN").map(PathBuf::from) else {
        eprintln!(
            "bench layout: L4MESH_LAYOUT_BIN names no release binary (run layout/make.sh): not run"
        );
        return;
    };
    // Without an API server the list would leave out what every sidecar in a cluster runs.
    let Some(assets) = apiserver::assets("bench layout") else {
        return;
    };
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("layout/l4mesh.order");
    let ours = symbols(&bin);
    let mut list = Vec::new();
    let mut parts = Vec::new();
    for (part, names) in profile(&bin, &assets) {
        let before = list.len();
        list.extend(names.into_iter().filter(|n| ours.contains(n)));
        parts.push(format!("{} {part}", list.len() - before));
    }
    fs::write(&out, list.join("\n") + "\n").expect("write layout/l4mesh.order");
    println!(
        "bench layout: {} functions ({}) written to {}",
        list.len(),
        parts.join(", "),
        out.display()
    );
}

/// The functions two sidecars run, in list order, each part named and holding only what the
/// parts before it did not, each in the order callgrind first names them. Four clusters:
/// stopped as soon as their sidecars are ready or after the traffic, without and with
/// Kubernetes. A start's functions first, without Kubernetes then what it adds; then the
/// traffic's likewise. The other order (Kubernetes' parts after all the rest) left a fresh
/// sidecar with Kubernetes on at 7,936 KiB against 7,184, and one without it where it was
/// (one run each, benches/RESULTS.md, issue 24, third session). Callgrind writes a profile
/// when its process exits (SIGTERM: the sidecar drains and exits); asking a running sidecar
/// for a dump (callgrind_control) needs ptrace across users, which containers often forbid.
fn profile(bin: &Path, assets: &Path) -> Vec<(&'static str, Vec<String>)> {
    let mut seen = HashSet::new();
    [
        ("run at start", false, None),
        ("added by Kubernetes at start", false, Some(assets)),
        ("added by traffic", true, None),
        ("added by Kubernetes traffic", true, Some(assets)),
    ]
    .into_iter()
    .map(|(part, traffic, kube)| {
        let names = run(bin, traffic, kube);
        (
            part,
            names
                .into_iter()
                .filter(|n| seen.insert(n.clone()))
                .collect(),
        )
    })
    .collect()
}

/// Starts a client and a server sidecar under callgrind (with an API server and Kubernetes
/// discovery if `kube` names its binaries), drives traffic through them if asked, stops them
/// and returns the functions in their profiles.
fn run(bin: &Path, traffic: bool, kube: Option<&Path>) -> Vec<String> {
    let mut c = Cluster::new("layout", 3);
    c.run_sidecars_from(bin);
    c.log_level = "info";
    let ca = c.make_ca();
    let api = kube.map(|assets| ApiServer::start(&c, assets));
    let discovery = api.as_ref().map(|api| services(&c, api));
    let cg = c.dir.path().join("callgrind");
    fs::create_dir_all(&cg).unwrap();
    // The sidecars run as the proxy user and write their profiles here.
    fs::set_permissions(&cg, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    make_proxy_readable(c.dir.path());
    // Valgrind goes inside the drop to the proxy user: wrapped around `setpriv`, it would
    // write its profile as root and the exec'd sidecar (same PID) could not reopen it.
    // `start_sidecar_wrapped` runs `<wrapper> setpriv <3 flags> <l4mesh and its arguments>`.
    let script = format!(
        "shift 4; exec setpriv --reuid=1337 --regid=1337 --clear-groups \
         valgrind --tool=callgrind --demangle=no --callgrind-out-file={}/cg.%p \"$@\"",
        cg.display()
    );
    let wrapper = ["sh", "-c", script.as_str(), "sh"];
    let rules = format!(
        "outbound:\n  rules:\n  - name: direct\n    cidrs: [\"{}/32\"]\n    ports: [\"{DIRECT}\"]\n    action: direct\n",
        c.pod(1).ip4
    );
    let (service_ips, discovery) = discovery.unzip();
    let discovery = discovery.unwrap_or_default();
    for (i, sa, extra) in [(0, "client", rules.as_str()), (1, "server", "")] {
        let certs = c.issue(&ca, &format!("certs-{i}"), "shop", sa);
        c.start_sidecar_wrapped(
            i,
            &format!("sidecar-{i}"),
            &sidecar_config(&certs, &format!("{extra}{discovery}")),
            &wrapper,
        );
    }
    if traffic {
        drive(&c);
        if let (Some(api), Some(ips)) = (&api, &service_ips) {
            drive_services(&c, api, ips);
        }
    }
    // The API server stays up until the sidecars have drained and written their profiles.
    let _api = api;
    for pid in c.sidecar_pids() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    read_profiles(&cg)
}

/// In the API: namespace `shop`, the sidecar's RBAC, the client and server Pods (meshed, with
/// the service accounts their certificates name) and two Services in front of the server's
/// echo, one selector-less (its Pod read after its slices) and one selecting it (its Pods
/// listed beside), with their ClusterIPs made as kube-proxy makes them. Returns the ClusterIPs
/// and the sidecars' discovery settings.
fn services(c: &Cluster, api: &ApiServer) -> (Vec<std::net::IpAddr>, String) {
    let (client, server) = (c.pod(0).ip4, c.pod(1).ip4);
    let ips = api.admin(move |k| async move {
        objects::namespace(&k, "shop", &["client", "server"]).await;
        objects::grant_sidecar(&k).await;
        objects::pod(&k, "shop", "client", "client", client, true).await;
        let uid = objects::pod(&k, "shop", "server", "server", server, true).await;
        let mut ips = Vec::new();
        for (name, spec) in [
            ("echo", serde_json::json!({})),
            (
                "echo-app",
                serde_json::json!({"selector": {"app": "server"}}),
            ),
        ] {
            let ports = [("tcp", SERVICE_PORT, ECHO.into())];
            ips.push(objects::service(&k, "shop", name, &ports, spec).await);
            let endpoints = [("server", uid.as_str(), server, true)];
            let slice = format!("{name}-1");
            objects::slice(&k, "shop", name, &slice, &[("tcp", ECHO)], &endpoints).await;
        }
        ips
    });
    for ip in &ips {
        c.service(&ip.to_string(), SERVICE_PORT, c.pod(1).addr(ECHO));
    }
    let kubeconfig = api.kubeconfig("sidecar", SIDECAR_TOKEN);
    // Under callgrind every step is ~50 times slower: the first answers take seconds.
    let config = format!(
        "discovery:\n  kubernetes: on\n  kubeconfig: {}\n  wait: 30s\n",
        kubeconfig.display()
    );
    (ips, config)
}

/// Through each Service; then a change to the first one's slice (a second, not ready,
/// endpoint), which its watch delivers, and through it again.
fn drive_services(c: &Cluster, api: &ApiServer, ips: &[std::net::IpAddr]) {
    let through = |ip| {
        let addr = std::net::SocketAddr::new(ip, SERVICE_PORT);
        for len in [100, 1 << 20] {
            assert_eq!(exchange(c, 0, addr, len), len, "through the Service");
        }
    };
    ips.iter().for_each(|ip| through(*ip));
    let server = c.pod(1).ip4;
    api.admin(move |k| async move {
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(k.clone(), "shop");
        let uid = pods.get("server").await.unwrap().metadata.uid.unwrap();
        let gone = "10.200.0.9".parse().unwrap();
        let endpoints = [
            ("server", uid.as_str(), server, true),
            ("gone", "", gone, false),
        ];
        objects::slice(&k, "shop", "echo", "echo-1", &[("tcp", ECHO)], &endpoints).await;
    });
    std::thread::sleep(Duration::from_secs(3));
    through(ips[0]);
}

/// The paths traffic takes through a client and a server sidecar.
fn drive(c: &Cluster) {
    echo_server(c.pod(1), c.pod(1).addr(ECHO), None);
    echo_server(c.pod(1), c.pod(1).addr(DIRECT), None);
    echo_server(c.pod(2), c.pod(2).addr(ECHO), None);
    let server = c.pod(1).addr(ECHO);
    for len in [100, 64 * 1024, 1 << 20] {
        for _ in 0..3 {
            assert_eq!(exchange(c, 0, server, len), len, "through the tunnel");
        }
    }
    let at_once: Vec<_> = (0..8)
        .map(|_| c.pod(0).spawn(move || exchange_here(server, 256 * 1024)))
        .collect();
    for t in at_once {
        assert_eq!(t.join().unwrap(), 256 * 1024, "streams at once");
    }
    let direct = c.pod(1).addr(DIRECT);
    for len in [100, 1 << 20] {
        assert_eq!(exchange(c, 0, direct, len), len, "direct transport");
    }
    for len in [100, 1 << 20] {
        assert_eq!(exchange(c, 2, server, len), len, "plaintext in");
        assert_eq!(
            exchange(c, 0, c.pod(2).addr(ECHO), len),
            len,
            "plaintext out"
        );
    }
    let _ = exchange(c, 0, c.pod(1).addr(9), 10);
    for pod in [0, 1] {
        for url in [
            "http://127.0.0.1:15020/metrics",
            "http://127.0.0.1:15020/healthz/ready",
            "http://127.0.0.1:15000/metrics",
            "http://127.0.0.1:15000/config_dump",
            "http://127.0.0.1:15000/plaintext_sources",
        ] {
            c.pod(pod).exec(&["curl", "-s", url]);
        }
    }
}

/// Waits for both sidecars' profiles (written as they exit) and returns the names in them.
fn read_profiles(dir: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let files = loop {
        let files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| finished(p))
            .collect();
        if files.len() >= 2 || Instant::now() > deadline {
            break files;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(files.len() >= 2, "callgrind profiles: {files:?}");
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    for f in files {
        for line in fs::read_to_string(&f).unwrap_or_default().lines() {
            // "fn=(12) _ZN..." the first time a function is named; "fn=(12)" afterwards.
            let rest = line
                .strip_prefix("fn=(")
                .or_else(|| line.strip_prefix("cfn=("));
            let Some(name) = rest.and_then(|r| r.split_once(") ")).map(|(_, n)| n.trim()) else {
                continue;
            };
            if seen.insert(name.to_string()) {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// Callgrind writes its profile's "totals:" line last.
fn finished(profile: &Path) -> bool {
    fs::read_to_string(profile)
        .map(|t| t.lines().any(|l| l.starts_with("totals:")))
        .unwrap_or(false)
}

/// The binary's function symbols, as `nm` lists them.
fn symbols(bin: &Path) -> HashSet<String> {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(bin)
        .output()
        .expect("nm");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_addr, kind, name) = (f.next()?, f.next()?, f.next()?);
            matches!(kind, "t" | "T" | "w" | "W").then(|| name.to_string())
        })
        .collect()
}
