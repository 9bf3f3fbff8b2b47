//! Test pods: network namespaces joined by a bridge, each with real iptables rules applied by
//! `l4mesh iptables apply` and a real sidecar process running as UID 1337. Everything is made
//! inside namespaces this test created, under names unique to the test, and torn down on drop
//! (also when the test fails). Addresses come from 198.18.0.0/15 and fd00:4d::/64, which exist
//! only inside those namespaces.

#![allow(dead_code)]

pub mod apiserver;

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_l4mesh");
pub const PROXY_UID: u32 = l4mesh::consts::PROXY_UID;

/// Whether privileged tests can run here. Without root, `ip`, `iptables`, `tcpdump`,
/// `setpriv`, `openssl`, `curl` or `prometheus` they print a loud SKIPPED line, unless
/// L4MESH_REQUIRE_PRIVILEGED=1 (CI), where a missing prerequisite fails the test.
pub fn privileged(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_string());
    }
    for tool in [
        "ip",
        "iptables-restore",
        "ip6tables-restore",
        "tcpdump",
        "setpriv",
        "openssl",
        "curl",
        "prometheus",
        "promtool",
    ] {
        if !installed(tool) {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: missing {}", missing.join(", "));
    if std::env::var("L4MESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("L4MESH_REQUIRE_PRIVILEGED=1 but {msg}");
    }
    eprintln!("\n*** SKIPPED privileged test {msg} ***\n");
    false
}

/// Whether `tool` is on the PATH.
pub fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique, short name prefix for this test's namespaces.
pub fn unique(tag: &str) -> String {
    format!(
        "l4m{}-{}{}",
        std::process::id(),
        tag,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// One pod: a network namespace with `eth0` on the bridge.
pub struct Pod {
    pub netns: String,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
}

impl Pod {
    /// Runs `f` on a thread whose network namespace is this pod's, and returns its result.
    /// The thread is "an unmodified application": it only knows addresses and ports.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("thread in pod panicked")
    }

    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
    }

    /// `ip netns exec` this pod.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.netns];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip4, port)
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip6, port)
    }
}

/// A set of pods on one bridge, torn down on drop.
pub struct Cluster {
    prefix: String,
    /// A copy of the l4mesh binary the proxy user can execute wherever the checkout is.
    sidecar_bin: PathBuf,
    node: String,
    pub pods: Vec<Pod>,
    children: Vec<Child>,
    pub dir: tempfile::TempDir,
    /// Sidecars' `--log-level`: debug for tests (their logs are asserted on), info for benches
    /// (what a deployment runs: per-connection debug lines cost time).
    pub log_level: &'static str,
}

impl Cluster {
    /// Makes `n` pods named `<prefix>-p0..`, addresses 198.18.0.1.. and fd00:4d::1..
    pub fn new(tag: &str, n: usize) -> Cluster {
        let prefix = unique(tag);
        let node = format!("{prefix}-node");
        let dir = tempfile::tempdir().expect("tempdir");
        // The sidecars run as UID 1337 and must read their configs and certificates.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let sidecar_bin = dir.path().join("l4mesh");
        fs::copy(BIN, &sidecar_bin).expect("copy l4mesh for the proxy user");
        fs::set_permissions(&sidecar_bin, fs::Permissions::from_mode(0o755)).unwrap();
        let mut cluster = Cluster {
            sidecar_bin,
            prefix: prefix.clone(),
            node: node.clone(),
            pods: Vec::new(),
            children: Vec::new(),
            dir,
            log_level: "debug",
        };
        sh(&["ip", "netns", "add", &node]);
        sh(&["ip", "-n", &node, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &node, "link", "set", "br0", "up"]);
        for i in 0..n {
            let netns = format!("{prefix}-p{i}");
            sh(&["ip", "netns", "add", &netns]);
            let pod = Pod {
                netns: netns.clone(),
                ip4: format!("198.18.0.{}", i + 1).parse().unwrap(),
                ip6: format!("fd00:4d::{}", i + 1).parse().unwrap(),
            };
            cluster.pods.push(pod);
            let port = format!("v{i}");
            sh(&[
                "ip", "-n", &node, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ]);
            sh(&[
                "ip", "-n", &node, "link", "set", &port, "master", "br0", "up",
            ]);
            sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "-n",
                &netns,
                "addr",
                "add",
                &format!("198.18.0.{}/24", i + 1),
                "dev",
                "eth0",
            ]);
            sh(&[
                "ip",
                "-n",
                &netns,
                "addr",
                "add",
                &format!("fd00:4d::{}/64", i + 1),
                "dev",
                "eth0",
                "nodad",
            ]);
            sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
        }
        cluster
    }

    /// Process IDs of the sidecars started so far, in start order.
    pub fn sidecar_pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }

    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    /// Makes `cluster_ip:port` a Service with one backend, `backend`, as kube-proxy does on
    /// a node: the node routes 10.96.0.0/12 for the pods, DNATs the Service port to the
    /// backend and masquerades it (so that replies come back through the node). Any other
    /// port of the ClusterIP leads nowhere: the node answers "network unreachable".
    pub fn service(&self, cluster_ip: &str, port: u16, backend: SocketAddr) {
        let node = &self.node;
        if !sh(&["ip", "-n", node, "addr", "show", "br0"]).contains("198.18.0.254") {
            sh(&[
                "ip",
                "-n",
                node,
                "addr",
                "add",
                "198.18.0.254/24",
                "dev",
                "br0",
            ]);
            sh(&[
                "ip",
                "netns",
                "exec",
                node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]);
            for pod in &self.pods {
                pod.exec(&["ip", "route", "add", "10.96.0.0/12", "via", "198.18.0.254"]);
            }
        }
        let nat = |rule: String| {
            let mut args = vec!["ip", "netns", "exec", node, "iptables", "-t", "nat", "-A"];
            args.extend(rule.split_whitespace());
            sh(&args);
        };
        let (ip, bport) = (backend.ip(), backend.port());
        nat(format!(
            "PREROUTING -d {cluster_ip} -p tcp --dport {port} -j DNAT --to-destination {backend}"
        ));
        nat(format!(
            "POSTROUTING -d {ip} -p tcp --dport {bport} -m conntrack --ctstate DNAT -j MASQUERADE"
        ));
    }

    /// Makes the node drop what reaches `cluster_ip` untranslated (ports the Service does not
    /// define), as kube-proxy's iptables mode does, instead of answering unreachable.
    pub fn blackhole(&self, cluster_ip: &str) {
        let node = &self.node;
        sh(&[
            "ip", "netns", "exec", node, "iptables", "-A", "FORWARD", "-d", cluster_ip, "-j",
            "DROP",
        ]);
    }

    /// Makes a CA in `<dir>/ca`.
    pub fn make_ca(&self) -> PathBuf {
        let ca = self.dir.path().join("ca");
        sh(&[BIN, "certs", "ca", "--out", ca.to_str().unwrap()]);
        ca
    }

    /// Issues `spiffe://cluster.local/ns/<ns>/sa/<sa>` into `<dir>/<name>`, readable by the
    /// proxy user.
    pub fn issue(&self, ca: &Path, name: &str, ns: &str, sa: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        issue_certs(ca, &out, ns, sa, "24h");
        make_proxy_readable(&out);
        out
    }

    /// Gives pod `i` the identity `spiffe://cluster.local/ns/shop/sa/<sa>` from `ca`, applies
    /// capture and starts its sidecar with `extra` appended to the config; returns its log.
    pub fn mesh_sidecar(&mut self, ca: &Path, i: usize, sa: &str, extra: &str) -> PathBuf {
        let certs = self.issue(ca, &format!("certs-{i}"), "shop", sa);
        self.start_sidecar(i, &format!("sidecar-{i}"), &sidecar_config(&certs, extra))
    }

    /// Runs this cluster's sidecars from `bin` instead of the binary cargo built for the tests:
    /// a `cargo build --release` binary, whose symbol names benches/layout.rs lists and whose
    /// start-up layout benches/compare.rs measures (`L4MESH_BENCH_BIN`).
    pub fn run_sidecars_from(&self, bin: &Path) {
        fs::copy(bin, &self.sidecar_bin).expect("copy the sidecar binary");
    }

    /// Applies capture in pod `i` and starts its sidecar with `config` (YAML written to
    /// `<dir>/<name>.yaml`); returns the path of its log once it says it is ready.
    pub fn start_sidecar(&mut self, i: usize, name: &str, config: &str) -> PathBuf {
        self.start_sidecar_wrapped(i, name, config, &[])
    }

    /// `start_sidecar`, with `wrapper` (e.g. `prlimit --nofile=64:64`) run around it.
    pub fn start_sidecar_wrapped(
        &mut self,
        i: usize,
        name: &str,
        config: &str,
        wrapper: &[&str],
    ) -> PathBuf {
        self.pods[i].exec(&[BIN, "iptables", "apply"]);
        let cfg = self.dir.path().join(format!("{name}.yaml"));
        fs::write(&cfg, config).unwrap();
        let log = self.dir.path().join(format!("{name}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.pods[i].netns])
            .args(wrapper)
            .args(["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"])
            .arg(&self.sidecar_bin)
            .args([
                "--log-level",
                self.log_level,
                "run",
                "--config",
                cfg.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sidecar");
        self.children.push(child);
        wait_for_log(&log, "l4mesh ready", Duration::from_secs(20));
        log
    }

    /// Starts `args` inside pod `i` (as root), stopped when the cluster drops; output goes to
    /// `<dir>/<name>.log`.
    pub fn spawn_in(&mut self, i: usize, name: &str, args: &[&str]) -> PathBuf {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.pods[i].netns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        self.children.push(child);
        log
    }

    /// Writes a policy file the sidecars can read and returns the config lines that use it.
    pub fn policy(&self, name: &str, yaml: &str) -> (PathBuf, String) {
        let path = self.dir.path().join(name);
        write_policy(&path, yaml);
        let extra = format!(
            "policy:\n  file: {}\n  reload_interval: 200ms\n",
            path.display()
        );
        (path, extra)
    }

    /// Starts tcpdump on pod `i`'s eth0 writing every packet to `<dir>/<name>.pcap`.
    pub fn capture(&mut self, i: usize, name: &str) -> Capture {
        let pcap = self.dir.path().join(format!("{name}.pcap"));
        let log = self.dir.path().join(format!("{name}.tcpdump.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.pods[i].netns])
            .args([
                "tcpdump",
                "--immediate-mode",
                "-Z",
                "root",
                "-i",
                "eth0",
                "-n",
                "-s",
                "0",
                "-B",
                "65536",
                "-U",
                "-w",
            ])
            .arg(&pcap)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start tcpdump");
        wait_for_log(&log, "listening on", Duration::from_secs(10));
        Capture {
            child: Some(child),
            pcap,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in &self.pods {
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node])
            .status();
        if std::thread::panicking() {
            // Keep the sidecar logs of a failed test where a person can read them.
            let keep = std::env::temp_dir().join(format!("{}-logs", self.prefix));
            let _ = fs::create_dir_all(&keep);
            if let Ok(entries) = fs::read_dir(self.dir.path()) {
                for e in entries.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "log") {
                        let _ = fs::copy(&p, keep.join(e.file_name()));
                    }
                }
            }
            eprintln!("sidecar logs kept in {}", keep.display());
        }
    }
}

/// A running packet capture.
pub struct Capture {
    child: Option<Child>,
    pub pcap: PathBuf,
}

impl Capture {
    /// Stops tcpdump (letting it flush) and returns the capture file's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        if let Some(mut child) = self.child.take() {
            // Let the last packets (FIN/ACK) reach tcpdump before asking it to stop.
            std::thread::sleep(Duration::from_millis(300));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = child.wait();
        }
        // `ip netns exec` execs tcpdump in place, so the child is tcpdump itself; on SIGINT it
        // flushes and closes the file before exiting.
        fs::read(&self.pcap).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `l4mesh certs issue`: `spiffe://cluster.local/ns/<ns>/sa/<sa>` from `ca`, valid for `ttl`
/// from now, into `out`.
pub fn issue_certs(ca: &Path, out: &Path, ns: &str, sa: &str, ttl: &str) {
    sh(&[
        BIN,
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--namespace",
        ns,
        "--service-account",
        sa,
        "--ttl",
        ttl,
        "--out",
        out.to_str().unwrap(),
    ]);
}

/// Replaces a policy file atomically (write + rename), readable by the proxy user.
pub fn write_policy(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, yaml).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// A PeerAuthentication for namespace `shop` (where the tests' workloads live).
pub fn peer_authentication(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: shop\n  namespace: shop\nspec:\n  mtls:\n    mode: {mode}\n"
    )
}

pub fn make_proxy_readable(dir: &Path) {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    for e in fs::read_dir(dir).unwrap().flatten() {
        std::os::unix::fs::chown(e.path(), Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    }
}

/// The sum of the samples of metric `name` whose line contains `filter`, as pod `pod`'s
/// sidecar serves them on :15020.
pub fn metric_sum(c: &Cluster, pod: usize, name: &str, filter: &str) -> f64 {
    c.pods[pod]
        .exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"])
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of the samples of metric `name` whose line contains every one of `filters`, as
/// pod `pod`'s sidecar serves them on :15020.
pub fn metric(c: &Cluster, pod: usize, name: &str, filters: &[&str]) -> f64 {
    c.pods[pod]
        .exec(&["curl", "-s", "http://127.0.0.1:15020/metrics"])
        .lines()
        .filter(|l| l.starts_with(name) && filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// From pod `from`: sends `len` bytes to `addr`, half-closes, returns how many came back.
pub fn exchange(c: &Cluster, from: usize, addr: SocketAddr, len: usize) -> usize {
    c.pod(from).run(move || exchange_here(addr, len))
}

/// Runs `migration-report` against pod `pod`'s own sidecar (admin port) over `window`, doing
/// `during` (from the test thread) once the window has begun; returns the report.
pub fn migration_report_while(
    c: &Cluster,
    pod: usize,
    window: &str,
    during: impl FnOnce(),
) -> String {
    let netns = c.pods[pod].netns.clone();
    let window = window.to_string();
    let report = std::thread::spawn(move || {
        sh(&[
            "ip",
            "netns",
            "exec",
            &netns,
            BIN,
            "migration-report",
            "--sidecar",
            "http://127.0.0.1:15000",
            "--window",
            &window,
        ])
    });
    std::thread::sleep(Duration::from_millis(700));
    during();
    report.join().unwrap()
}

/// Waits until `log` contains `needle`, panicking with the log after `timeout`.
pub fn wait_for_log(log: &Path, needle: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        if start.elapsed() > timeout {
            panic!("{} never said {needle:?}:\n{text}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sidecar config for a workload whose certificates are in `certs`.
pub fn sidecar_config(certs: &Path, extra: &str) -> String {
    format!(
        "identity:\n  trust_domain: cluster.local\n  cert_chain: {c}/cert-chain.pem\n  private_key: {c}/key.pem\n  trust_bundle: {c}/root-cert.pem\n{extra}",
        c = certs.display()
    )
}

/// Starts an echo server on `addr` in `pod` that serves every connection until it closes;
/// `seen` (when given) counts the bytes that reach it.
pub fn echo_server(pod: &Pod, addr: SocketAddr, seen: Option<std::sync::Arc<AtomicUsize>>) {
    let listener = pod.run(move || listen(addr));
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if let Some(seen) = &seen {
                        seen.fetch_add(n, Ordering::SeqCst);
                    }
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// From the calling thread's netns: sends `len` bytes, half-closes, and returns how many
/// bytes came back (0 when refused).
pub fn exchange_here(addr: SocketAddr, len: usize) -> usize {
    let Ok(mut s) = connect(addr) else { return 0 };
    let _ = s.write_all(&vec![b'x'; len]);
    let _ = s.shutdown(std::net::Shutdown::Write);
    read_all(&mut s).0.len()
}

/// `len` bytes of deterministic data with `marker` every 4 KiB, so any plaintext leak shows.
pub fn payload(len: usize, seed: u64, marker: &[u8]) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        if v.len() % 4096 == 0 && !marker.is_empty() {
            v.extend_from_slice(marker);
        } else {
            // xorshift64: cheap, deterministic, incompressible enough.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
    }
    v.truncate(len);
    v
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Connects with a timeout and bounded reads/writes, so a broken proxy fails the test instead
/// of hanging it.
pub fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

pub fn listen(addr: SocketAddr) -> TcpListener {
    TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// Reads until EOF (or error), returning what arrived.
pub fn read_all(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return (buf, None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return (buf, Some(e)),
        }
    }
}

pub fn write_all(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).expect("write");
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// Counts TLS 1.3 application-data record headers (0x17 0x03 0x03) in a capture.
pub fn tls_app_data_records(pcap: &[u8]) -> usize {
    memchr::memmem::find_iter(pcap, &[0x17, 0x03, 0x03]).count()
}

/// The (source, destination) TCP ports of every IPv4 or IPv6 TCP segment in a pcap file
/// captured on an Ethernet interface.
pub fn tcp_ports(pcap: &[u8]) -> Vec<(u16, u16)> {
    let mut ports = Vec::new();
    let mut at = 24; // global header
    while at + 16 <= pcap.len() {
        let caplen = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &pcap[(at + 16).min(pcap.len())..(at + 16 + caplen).min(pcap.len())];
        at += 16 + caplen;
        if frame.len() < 14 {
            continue;
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let ip = &frame[14..];
        let tcp = match ethertype {
            0x0800 if ip.len() >= 20 && ip[9] == 6 => {
                &ip[((ip[0] & 0x0f) as usize * 4).min(ip.len())..]
            }
            0x86dd if ip.len() >= 40 && ip[6] == 6 => &ip[40..],
            _ => continue,
        };
        if tcp.len() >= 4 {
            ports.push((
                u16::from_be_bytes([tcp[0], tcp[1]]),
                u16::from_be_bytes([tcp[2], tcp[3]]),
            ));
        }
    }
    ports
}

/// A process's CPU time (user + system), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// A process's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// A `/proc/<pid>/status` figure in KiB (`VmRSS`, `RssAnon`, ...); 0 when unreadable.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
