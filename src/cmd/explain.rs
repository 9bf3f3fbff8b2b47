//! `l4mesh check --explain` and `l4mesh simulate`: what the policy file means for one
//! workload, worked out from its namespace, service account and labels alone (no certificate,
//! no listener, no traffic). Both resolve the file exactly as the sidecar does
//! (`WorkloadPolicy::resolve`) and ask the same [`Authorizer`](crate::policy::authz::Authorizer)
//! the data path asks, so what they print is what the sidecar would do.

use std::net::{IpAddr, SocketAddr};

use serde_json::json;
use thiserror::Error;

use crate::config::Config;
use crate::identity::SpiffeId;
use crate::policy::authz::{labels_text, Action, Decision, Peer};
use crate::policy::{Mode, PolicyError, PolicySet, Workload, WorkloadPolicy};

/// Why the question cannot be answered.
#[derive(Debug, Error)]
pub enum ExplainError {
    #[error("the workload's namespace is needed: pass --namespace, or set workload.namespace in the config")]
    NoNamespace,
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// The workload asked about: the config's `workload` section, with the command line's
/// `--namespace`, `--service-account` and `--label` over it.
#[derive(Clone, Debug, Default)]
pub struct Subject {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    /// `key=value`, over the config's labels.
    pub labels: Vec<(String, String)>,
}

impl Subject {
    /// Puts the command line's answers over the config's `workload` (plain `check`, which
    /// loads the workload as `run` would and so reads it from the config).
    pub fn over(&self, workload: &mut crate::config::Workload) {
        if let Some(ns) = &self.namespace {
            workload.namespace = Some(ns.clone());
        }
        if let Some(sa) = &self.service_account {
            workload.service_account = Some(sa.clone());
        }
        workload.labels.extend(self.labels.iter().cloned());
    }
}

/// The file, read, and resolved for the subject.
struct Resolved {
    workload: Workload,
    service_account: Option<String>,
    set: PolicySet,
    policy: WorkloadPolicy,
}

fn resolve(config: &Config, subject: &Subject) -> Result<Resolved, ExplainError> {
    let namespace = subject
        .namespace
        .clone()
        .or_else(|| config.workload.namespace.clone())
        .ok_or(ExplainError::NoNamespace)?;
    let mut labels = config.workload.labels.clone();
    labels.extend(subject.labels.iter().cloned());
    let workload = Workload {
        namespace,
        labels,
        trust_domains: config.identity.trust_domains(),
    };
    let set = crate::state::policy::load_set(config)?;
    let policy = WorkloadPolicy::resolve(&set, &workload, &config.policy.root_namespace)?;
    Ok(Resolved {
        workload,
        service_account: subject
            .service_account
            .clone()
            .or_else(|| config.workload.service_account.clone()),
        set,
        policy,
    })
}

/// `check --explain`: every resource that applies and why, every one skipped and why, every
/// rule cut down at L4, dry-run policies called out.
pub fn explain(config: &Config, subject: &Subject) -> Result<String, ExplainError> {
    let r = resolve(config, subject)?;
    let mut out = String::new();
    let w = &r.workload;
    let labels = if w.labels.is_empty() {
        "(none)".to_string()
    } else {
        labels_text(&w.labels)
    };
    outln!(
        out,
        "workload: namespace {}, service account {}, labels {labels}",
        w.namespace,
        r.service_account.as_deref().unwrap_or("(not given)")
    );
    let file = config
        .policy
        .file
        .as_ref()
        .map_or("none".to_string(), |p| p.display().to_string());
    outln!(
        out,
        "policy file: {file} (root namespace {}, trust domain {})",
        config.policy.root_namespace,
        w.trust_domains
    );

    outln!(out, "");
    let mtls = &r.policy.mtls;
    crate::cmd::check::describe_modes(mtls, &mut out);

    outln!(out, "\nPeerAuthentications:");
    if mtls.considered.is_empty() {
        outln!(out, "  (none in the file)");
    }
    for (id, verdict) in &mtls.considered {
        match verdict {
            Ok(how) => outln!(out, "  applies  {id}: {how}"),
            Err(why) => outln!(out, "  skipped  {id}: {why}"),
        }
    }

    outln!(out, "\nAuthorizationPolicies:");
    let authz = &r.policy.authz;
    if authz.considered.is_empty() {
        outln!(out, "  (none in the file)");
    }
    for c in &authz.considered {
        let action = match c.action {
            Action::Custom => "CUSTOM (enforced as DENY)".to_string(),
            a => a.name().to_string(),
        };
        let dry = if c.dry_run {
            " [dry run: evaluated and counted, never enforced]"
        } else {
            ""
        };
        match &c.applies {
            Ok(why) => outln!(out, "  applies  {} {action}: {why}{dry}", c.id),
            Err(why) => outln!(out, "  skipped  {} {action}: {why}{dry}", c.id),
        }
    }
    let (allow, deny, audit) = authz.counts();
    let open = if allow == 0 {
        " (no ALLOW policy: every peer not denied is allowed)"
    } else {
        ""
    };
    outln!(
        out,
        "  enforced: {allow} ALLOW, {deny} DENY (CUSTOM included), {audit} AUDIT{open}"
    );

    outln!(out, "\nwhat l4mesh cannot enforce as written:");
    let notes: Vec<&String> = r
        .policy
        .mtls
        .warnings
        .iter()
        .chain(&authz.warnings)
        .collect();
    if notes.is_empty() {
        outln!(out, "  nothing");
    }
    for n in notes {
        outln!(out, "  {n}");
    }

    outln!(out, "\nother documents:");
    if r.set.skipped.is_empty() && r.policy.broken_elsewhere.is_empty() {
        outln!(out, "  none");
    }
    for s in &r.set.skipped {
        outln!(out, "  skipped  document {}{}: {}", s.index, s.what, s.why);
    }
    for b in &r.policy.broken_elsewhere {
        outln!(out, "  broken   {b}");
    }
    Ok(out)
}

/// Who `simulate` pretends is connecting.
#[derive(Clone, Debug)]
pub enum From {
    Mesh(SpiffeId),
    Plaintext,
}

impl std::str::FromStr for From {
    type Err = String;
    fn from_str(s: &str) -> Result<From, String> {
        if s == "plaintext" {
            return Ok(From::Plaintext);
        }
        s.parse::<SpiffeId>()
            .map(From::Mesh)
            .map_err(|e| format!("{s:?}: neither `plaintext` nor a SPIFFE ID: {e}"))
    }
}

/// One connection to simulate.
#[derive(Clone, Debug)]
pub struct Connection {
    pub from: From,
    pub source_ip: IpAddr,
    pub port: u16,
    /// The pod address dialled; the config's `workload.pod_ip` when not given.
    pub destination_ip: Option<IpAddr>,
}

/// What the sidecar would do with a connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Simulation {
    pub mode: Mode,
    /// Where the mode came from (`PeerAuthentication ns/name, level`).
    pub mode_source: String,
    /// What detection would see: `mtls`, `plaintext`, or `none` (DISABLE: no detection).
    pub detected: &'static str,
    pub allowed: bool,
    /// What refused it: `strict`, `handshake` (a peer of another trust domain) or
    /// `authorization`; `None` when allowed.
    pub refused_by: Option<&'static str>,
    /// The deciding policy (`ns/name`) and rule, or what decided without one.
    pub policy: String,
    pub rule: Option<usize>,
    pub reason: String,
    /// AUDIT rules that matched.
    pub audits: Vec<(String, usize)>,
    /// Dry-run policies: `(policy, rule, would-be decision)`.
    pub dry_run: Vec<(String, Option<usize>, &'static str)>,
}

/// `simulate`: the decision for one connection, step by step as `inbound` takes it.
pub fn simulate(
    config: &Config,
    subject: &Subject,
    conn: &Connection,
) -> Result<Simulation, ExplainError> {
    let r = resolve(config, subject)?;
    let (mode, source) = r.policy.mtls.mode_for(conn.port).clone();
    let mut sim = Simulation {
        mode,
        mode_source: source.to_string(),
        detected: "none",
        allowed: false,
        refused_by: None,
        policy: String::new(),
        rule: None,
        reason: String::new(),
        audits: Vec::new(),
        dry_run: Vec::new(),
    };
    // DISABLE forwards bytes as they are: a mesh client's TLS is not terminated, so its
    // identity is never seen and authorization judges the connection as plaintext.
    let peer_id = match (&conn.from, mode) {
        (_, Mode::Disable) => None,
        (From::Mesh(id), _) => {
            sim.detected = "mtls";
            Some(id)
        }
        (From::Plaintext, _) => {
            sim.detected = "plaintext";
            None
        }
    };
    if let Some(id) = peer_id {
        if !r.workload.trust_domains.contains(id.trust_domain()) {
            sim.refused_by = Some("handshake");
            sim.reason = format!(
                "refused in the handshake: {id} is not in trust domain {}",
                r.workload.trust_domains
            );
            return Ok(sim);
        }
    }
    if mode == Mode::Strict && sim.detected == "plaintext" {
        sim.refused_by = Some("strict");
        sim.policy = source.resource.clone().unwrap_or_default();
        sim.reason = format!("refused: plaintext is not mesh mTLS (STRICT, from {source})");
        return Ok(sim);
    }
    let principal = peer_id.map(SpiffeId::principal);
    let (namespace, service_account) = peer_id
        .and_then(|id| id.namespace_and_service_account())
        .unzip();
    let destination = SocketAddr::new(
        conn.destination_ip
            .or(config.workload.pod_ip)
            .unwrap_or(IpAddr::from([0, 0, 0, 0])),
        conn.port,
    );
    let verdict = r.policy.authz.decide(&Peer {
        principal: principal.as_deref(),
        namespace,
        service_account,
        source_ip: conn.source_ip,
        destination,
    });
    sim.audits = verdict
        .audits
        .iter()
        .map(|m| (m.policy.to_string(), m.rule))
        .collect();
    sim.dry_run = verdict
        .dry_run
        .iter()
        .map(|d| (d.policy.to_string(), d.rule, d.decision))
        .collect();
    sim.policy = verdict.decision.policy_label().to_string();
    sim.allowed = verdict.decision.is_allowed();
    (sim.rule, sim.reason) = match &verdict.decision {
        Decision::Allow(Some(m)) => (Some(m.rule), format!("allowed by {m}")),
        Decision::Allow(None) => (None, "allowed: no ALLOW policy applies".to_string()),
        Decision::Deny(Some(m)) => (Some(m.rule), format!("denied by {m}")),
        Decision::Deny(None) => (
            None,
            format!("denied: {}", r.policy.authz.no_allow_matched()),
        ),
    };
    if !sim.allowed {
        sim.refused_by = Some("authorization");
    }
    Ok(sim)
}

impl Simulation {
    pub fn text(&self) -> String {
        let mut out = String::new();
        outln!(out, "mode: {} ({})", self.mode, self.mode_source);
        outln!(out, "detected: {}", self.detected);
        outln!(
            out,
            "decision: {}",
            if self.allowed { "ALLOW" } else { "DENY" }
        );
        outln!(out, "reason: {}", self.reason);
        for (policy, rule) in &self.audits {
            outln!(
                out,
                "audit: {policy} rules[{rule}] matched (logged, decides nothing)"
            );
        }
        for (policy, rule, decision) in &self.dry_run {
            let rule = rule.map(|r| format!(" rules[{r}]")).unwrap_or_default();
            outln!(
                out,
                "dry run: {policy}{rule} would {decision} (not enforced)"
            );
        }
        out
    }

    pub fn json(&self) -> String {
        let v = json!({
            "mode": self.mode.to_string(),
            "mode_source": self.mode_source,
            "detected": self.detected,
            "decision": if self.allowed { "allow" } else { "deny" },
            "refused_by": self.refused_by,
            "policy": self.policy,
            "rule": self.rule,
            "reason": self.reason,
            "audit": self.audits.iter().map(|(p, r)| json!({"policy": p, "rule": r})).collect::<Vec<_>>(),
            "dry_run": self.dry_run.iter().map(|(p, r, d)| json!({"policy": p, "rule": r, "decision": d})).collect::<Vec<_>>(),
        });
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }
}

/// Parses `key=value` (a `--label`).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: write a label as key=value")),
    }
}
