//! Capture: the iptables rules that send a pod's TCP traffic into the sidecar, run once by the
//! init container before anything else in the pod starts. `rules()` is a pure function from
//! options to an iptables-restore ruleset (golden-tested); `apply` and `cleanup` are thin,
//! atomic executors around iptables-save / iptables-restore. The chains mirror istio-iptables.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use crate::consts;
use thiserror::Error;

/// Ports never captured inbound: admin, tunnel, metrics/readiness, health (as Istio).
pub const ALWAYS_EXCLUDED_INBOUND: [u16; 4] = [
    consts::ADMIN_PORT,
    consts::TUNNEL_PORT,
    consts::STATS_PORT,
    consts::HEALTH_PORT,
];

const CHAINS: [&str; 4] = [
    "L4MESH_INBOUND",
    "L4MESH_IN_REDIRECT",
    "L4MESH_OUTPUT",
    "L4MESH_REDIRECT",
];

/// What to capture, as the options of istio-iptables that matter at L4; also the flags of
/// `l4mesh iptables apply|cleanup|print` (one definition for both).
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// UID the proxy runs as; its traffic is never captured.
    #[arg(long, default_value_t = consts::PROXY_UID)]
    pub proxy_uid: u32,
    /// GID the proxy runs as; likewise.
    #[arg(long, default_value_t = consts::PROXY_GID)]
    pub proxy_gid: u32,
    /// Port of the outbound listener, where outbound connections are redirected.
    #[arg(long, default_value_t = consts::OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Port of the inbound listener, where inbound connections are redirected.
    #[arg(long, default_value_t = consts::INBOUND_PORT)]
    pub inbound_port: u16,
    /// Inbound ports to capture, comma-separated, or `*` for all.
    #[arg(long, default_value = "*")]
    pub inbound_ports: InboundPorts,
    /// Inbound ports never to capture (15000, 15008, 15020, 15021 always are excluded).
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never to capture.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs never to capture.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Also capture IPv6 (ip6tables).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6: bool,
}

/// Which inbound ports are captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundPorts {
    All,
    Only(Vec<u16>),
}

impl std::str::FromStr for InboundPorts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "*" => Ok(InboundPorts::All),
            list => list
                .split(',')
                .map(|p| p.trim().parse::<u16>())
                .collect::<Result<Vec<_>, _>>()
                .map(InboundPorts::Only)
                .map_err(|e| format!("{list:?}: expected `*` or comma-separated ports: {e}")),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            proxy_uid: consts::PROXY_UID,
            proxy_gid: consts::PROXY_GID,
            outbound_port: consts::OUTBOUND_PORT,
            inbound_port: consts::INBOUND_PORT,
            inbound_ports: InboundPorts::All,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            ipv6: true,
        }
    }
}

/// IPv4 (iptables) or IPv6 (ip6tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn save_cmd(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
    fn restore_cmd(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn localhost(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
    /// Every loopback address.
    fn loopback_net(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
    /// The address the inbound side reaches the app from (see `socket.rs`).
    fn inbound_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }
    fn families(opts: &Options) -> Vec<Family> {
        if opts.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }
}

/// Why capture could not be applied or removed.
#[derive(Debug, Error)]
pub enum IptablesError {
    #[error("running {cmd}: {source} (is iptables installed, and are we root in this netns?)")]
    Spawn {
        cmd: &'static str,
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: &'static str, stderr: String },
}

/// The two jumps that hook our chains into the built-in ones, exactly as iptables-save prints
/// them (so apply can tell whether they are already there).
fn jumps() -> [&'static str; 2] {
    [
        "-A PREROUTING -p tcp -j L4MESH_INBOUND",
        "-A OUTPUT -p tcp -j L4MESH_OUTPUT",
    ]
}

/// The ruleset for one family, in iptables-restore format, for `--noflush` application.
pub fn rules(opts: &Options, family: Family) -> String {
    let mut r = String::new();
    let mut line = |s: String| {
        r.push_str(&s);
        r.push('\n');
    };
    line("*nat".into());
    for chain in CHAINS {
        line(format!(":{chain} - [0:0]"));
    }
    for jump in jumps() {
        line(jump.to_string());
    }

    // Traffic addressed to localhost that arrives on a pod interface (a forged frame, or a
    // peer with a route to 127.0.0.1 via this pod) is never redirected: left alone, the
    // kernel drops it as a martian; redirected, it would reach apps bound only to localhost
    // (issue 13). Istio's sidecars rely on the same kernel drop. (For IPv6 the kernel drops
    // ::1 from outside before netfilter; the rule is there for parity.) The inbound side
    // refuses such destinations as well, should a rule ever let one through.
    line(format!(
        "-A L4MESH_INBOUND -d {} ! -i lo -j RETURN",
        family.loopback_net()
    ));
    // Inbound: everything else addressed to the pod goes to the inbound listener, except
    // the sidecar's own ports and the excluded ones.
    let mut excluded: Vec<u16> = ALWAYS_EXCLUDED_INBOUND
        .iter()
        .chain(&opts.exclude_inbound_ports)
        .copied()
        .collect();
    excluded.sort_unstable();
    excluded.dedup();
    for port in &excluded {
        line(format!("-A L4MESH_INBOUND -p tcp --dport {port} -j RETURN"));
    }
    match &opts.inbound_ports {
        InboundPorts::All => line("-A L4MESH_INBOUND -p tcp -j L4MESH_IN_REDIRECT".into()),
        InboundPorts::Only(ports) => {
            for port in ports.iter().filter(|p| !excluded.contains(p)) {
                line(format!(
                    "-A L4MESH_INBOUND -p tcp --dport {port} -j L4MESH_IN_REDIRECT"
                ));
            }
        }
    }
    line(format!(
        "-A L4MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        opts.inbound_port
    ));

    // Outbound, in istio-iptables' order.
    let (uid, gid, lo, src) = (
        opts.proxy_uid,
        opts.proxy_gid,
        family.localhost(),
        family.inbound_source(),
    );
    // The inbound side's connections to the app: never captured.
    line(format!("-A L4MESH_OUTPUT -s {src} -o lo -j RETURN"));
    // The proxy calling its own pod IP (an app calling itself through a service): that is an
    // inbound connection, so it goes through the inbound listener.
    line(format!(
        "-A L4MESH_OUTPUT ! -d {lo} -o lo -m owner --uid-owner {uid} -j L4MESH_IN_REDIRECT"
    ));
    // The app talking to itself over lo: not mesh traffic.
    line(format!(
        "-A L4MESH_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN"
    ));
    // Everything else the proxy sends is already handled: never capture it again.
    line(format!(
        "-A L4MESH_OUTPUT -m owner --uid-owner {uid} -j RETURN"
    ));
    line(format!(
        "-A L4MESH_OUTPUT ! -d {lo} -o lo -m owner --gid-owner {gid} -j L4MESH_IN_REDIRECT"
    ));
    line(format!(
        "-A L4MESH_OUTPUT -o lo -m owner ! --gid-owner {gid} -j RETURN"
    ));
    line(format!(
        "-A L4MESH_OUTPUT -m owner --gid-owner {gid} -j RETURN"
    ));
    line(format!("-A L4MESH_OUTPUT -d {lo} -j RETURN"));
    for port in &opts.exclude_outbound_ports {
        line(format!("-A L4MESH_OUTPUT -p tcp --dport {port} -j RETURN"));
    }
    for net in &opts.exclude_outbound_cidrs {
        let matches = matches!(
            (family, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        );
        if matches {
            line(format!("-A L4MESH_OUTPUT -d {net} -j RETURN"));
        }
    }
    line("-A L4MESH_OUTPUT -j L4MESH_REDIRECT".into());
    line(format!(
        "-A L4MESH_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        opts.outbound_port
    ));
    line("COMMIT".into());
    r
}

/// What `l4mesh iptables print` shows: every family's ruleset.
pub fn print(opts: &Options) -> String {
    Family::families(opts)
        .into_iter()
        .map(|f| format!("# {}\n{}", f.restore_cmd(), rules(opts, f)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Installs the capture rules, atomically per family. Idempotent: our chains are redefined
/// (which flushes them) and the jumps into them are added only if missing.
pub fn apply(opts: &Options) -> Result<(), IptablesError> {
    for family in Family::families(opts) {
        let current = save(family)?;
        let ruleset: String = rules(opts, family)
            .lines()
            .filter(|l| !(jumps().contains(l) && current.lines().any(|c| c == *l)))
            .map(|l| format!("{l}\n"))
            .collect();
        restore(family, &ruleset)?;
        if family == Family::V6 {
            // The inbound side reaches IPv6 apps from ::6, which, unlike 127.0.0.6, is not
            // local until it is put on lo.
            lo_address("replace")?;
        }
    }
    Ok(())
}

/// Adds or removes `::6/128` on lo (`replace` is idempotent; `del` fails if absent).
fn lo_address(verb: &'static str) -> Result<(), IptablesError> {
    let cmd = "ip";
    let out = Command::new(cmd)
        .args(["-6", "addr", verb, "::6/128", "dev", "lo", "nodad"])
        .output()
        .map_err(|source| IptablesError::Spawn { cmd, source })?;
    if !out.status.success() && verb != "del" {
        return Err(IptablesError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Removes exactly what `apply` added: the jumps into our chains, then the chains. Rules that
/// were there before are left as they were.
pub fn cleanup(opts: &Options) -> Result<(), IptablesError> {
    for family in Family::families(opts) {
        let current = save(family)?;
        if let Some(ruleset) = cleanup_ruleset(&current) {
            restore(family, &ruleset)?;
            if family == Family::V6 {
                lo_address("del")?;
            }
        }
    }
    Ok(())
}

/// The iptables-restore input that undoes our rules in `saved` (iptables-save output of the
/// nat table), or `None` when nothing of ours is there.
fn cleanup_ruleset(saved: &str) -> Option<String> {
    let ours = |l: &str| CHAINS.iter().any(|c| l.ends_with(&format!("-j {c}")));
    let mut out = String::from("*nat\n");
    let mut found = false;
    for l in saved.lines() {
        if let Some(rule) = l
            .strip_prefix("-A PREROUTING ")
            .or(l.strip_prefix("-A OUTPUT "))
        {
            if ours(rule) {
                let chain = if l.starts_with("-A PREROUTING") {
                    "PREROUTING"
                } else {
                    "OUTPUT"
                };
                out.push_str(&format!("-D {chain} {rule}\n"));
                found = true;
            }
        }
    }
    let existing: Vec<&str> = CHAINS
        .iter()
        .copied()
        .filter(|c| saved.lines().any(|l| l.starts_with(&format!(":{c} "))))
        .collect();
    for c in &existing {
        out.push_str(&format!("-F {c}\n"));
    }
    for c in &existing {
        out.push_str(&format!("-X {c}\n"));
    }
    found |= !existing.is_empty();
    out.push_str("COMMIT\n");
    found.then_some(out)
}

fn save(family: Family) -> Result<String, IptablesError> {
    let cmd = family.save_cmd();
    let out = Command::new(cmd)
        .args(["-t", "nat"])
        .output()
        .map_err(|source| IptablesError::Spawn { cmd, source })?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn restore(family: Family, ruleset: &str) -> Result<(), IptablesError> {
    let cmd = family.restore_cmd();
    let mut child = Command::new(cmd)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| IptablesError::Spawn { cmd, source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(|source| IptablesError::Spawn { cmd, source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| IptablesError::Spawn { cmd, source })?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_match_the_golden_files() {
        let golden = |name: &str| {
            let path = format!("{}/iptables/{name}", env!("CARGO_MANIFEST_DIR"));
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let opts = Options::default();
        assert_eq!(rules(&opts, Family::V4), golden("rules-v4.golden"));
        assert_eq!(rules(&opts, Family::V6), golden("rules-v6.golden"));
    }

    #[test]
    fn options_shape_the_rules() {
        let opts = Options {
            inbound_ports: InboundPorts::Only(vec![8080, 15020, 9090]),
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            proxy_uid: 2000,
            ..Options::default()
        };
        let v4 = rules(&opts, Family::V4);
        assert!(v4.contains("-A L4MESH_INBOUND -p tcp --dport 22 -j RETURN\n"));
        assert!(v4.contains("-A L4MESH_INBOUND -p tcp --dport 8080 -j L4MESH_IN_REDIRECT\n"));
        assert!(!v4.contains("--dport 15020 -j L4MESH_IN_REDIRECT"));
        assert!(!v4.contains("-A L4MESH_INBOUND -p tcp -j L4MESH_IN_REDIRECT"));
        assert!(v4.contains("-A L4MESH_OUTPUT -p tcp --dport 5432 -j RETURN\n"));
        assert!(v4.contains("-A L4MESH_OUTPUT -d 10.96.0.0/12 -j RETURN\n"));
        assert!(!v4.contains("fd00::/8"));
        assert!(v4.contains("--uid-owner 2000"));
        let v6 = rules(&opts, Family::V6);
        assert!(v6.contains("-A L4MESH_OUTPUT -d fd00::/8 -j RETURN\n"));
        assert!(v6.contains("-A L4MESH_OUTPUT -s ::6/128 -o lo -j RETURN\n"));
        assert!(!v6.contains("10.96.0.0/12"));
    }

    #[test]
    fn cleanup_removes_only_our_rules() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:L4MESH_INBOUND - [0:0]\n:L4MESH_OUTPUT - [0:0]\n-A PREROUTING -p tcp -j L4MESH_INBOUND\n-A PREROUTING -p tcp --dport 80 -j REDIRECT --to-ports 8080\n-A OUTPUT -p tcp -j L4MESH_OUTPUT\n-A L4MESH_INBOUND -p tcp -j RETURN\nCOMMIT\n";
        let undo = cleanup_ruleset(saved).unwrap();
        assert_eq!(
            undo,
            "*nat\n-D PREROUTING -p tcp -j L4MESH_INBOUND\n-D OUTPUT -p tcp -j L4MESH_OUTPUT\n-F L4MESH_INBOUND\n-F L4MESH_OUTPUT\n-X L4MESH_INBOUND\n-X L4MESH_OUTPUT\nCOMMIT\n"
        );
        assert_eq!(
            cleanup_ruleset("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"),
            None
        );
    }
}
