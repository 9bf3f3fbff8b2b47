//! Authorization: who may connect to this workload, from Istio `AuthorizationPolicy` resources
//! (their L4 subset). Parsed with the rest of the policy file, compiled once per reload into an
//! [`Authorizer`] holding only the policies that apply to this workload, and consulted by
//! `inbound` and `tunnel` for every connection before a byte reaches the application.
//!
//! Istio's evaluation: AUDIT policies only log; any matching DENY denies; with no ALLOW policy
//! the connection is allowed; otherwise it is allowed only if some ALLOW rule matches. What an
//! L4 proxy cannot check is treated as Istio's TCP filter treats it: an ALLOW rule naming it
//! never matches, a DENY rule applies on its other fields (both fail closed). CUSTOM policies
//! (an external authorizer l4mesh does not have) deny what their rules match. Policies
//! annotated `istio.io/dry-run: "true"` are evaluated and reported, never enforced.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;

use crate::identity::spiffe::{Glob, TrustDomains};
use crate::parse::PortRange;
use crate::policy::Workload;

/// What a policy does when one of its rules matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// One `AuthorizationPolicy`, as written.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default = "allow")]
    pub action: Action,
    /// The extension provider of a CUSTOM policy (l4mesh has none).
    #[serde(default)]
    pub provider: Option<serde_yaml::Value>,
    /// `None` (absent) and `Some([])` both mean "no rules": an ALLOW policy then matches
    /// nothing, so it denies everything (`spec: {}`).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Binds the policy to a gateway or waypoint: a policy with either does not apply to
    /// sidecars, as in Istio (the policy file skips it).
    #[serde(default)]
    pub target_ref: Option<serde_yaml::Value>,
    #[serde(default)]
    pub target_refs: Option<serde_yaml::Value>,
}

fn allow() -> Action {
    Action::Allow
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    pub source: SourceSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SourceSpec {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    /// `<namespace>/<name>`, or `<name>` in the policy's own namespace (Istio 1.25+).
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub trust_domains: Vec<String>,
    pub not_trust_domains: Vec<String>,
    pub ip_blocks: Vec<IpBlock>,
    pub not_ip_blocks: Vec<IpBlock>,
    pub remote_ip_blocks: Vec<IpBlock>,
    pub not_remote_ip_blocks: Vec<IpBlock>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    pub operation: OperationSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OperationSpec {
    pub ports: Vec<PortRange>,
    pub not_ports: Vec<PortRange>,
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// An address or CIDR, as Istio writes them (`1.2.3.4` or `1.2.3.0/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpBlock(pub IpNet);

impl std::str::FromStr for IpBlock {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map(|n| IpBlock(n.trunc()))
            .map_err(|_| format!("invalid IP address or CIDR {s:?}"))
    }
}

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::parse::from_str(d, "an IP address or CIDR", |s: &str| s.parse::<IpBlock>())
    }
}

/// A service account as Istio's `serviceAccounts` names it: `(namespace, name)`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ServiceAccount(String, String);

impl ServiceAccount {
    /// `ns/name`, or `name` in `policy_namespace`; no wildcard of any form (Istio's rule).
    fn parse(value: &str, policy_namespace: &str) -> Result<ServiceAccount, String> {
        if value.contains('*') {
            return Err(format!(
                "{value:?}: no wildcard is allowed in a service account"
            ));
        }
        let (ns, name) = value.split_once('/').unwrap_or((policy_namespace, value));
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            return Err(format!(
                "{value:?} is not `<namespace>/<service account>` or `<service account>`"
            ));
        }
        Ok(ServiceAccount(ns.to_string(), name.to_string()))
    }
}

/// A `when` key: one l4mesh evaluates, or one it cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    SourcePrincipal,
    SourceNamespace,
    SourceServiceAccount,
    SourceTrustDomain,
    SourceIp,
    RemoteIp,
    DestinationIp,
    DestinationPort,
    /// Valid in Istio but not evaluable by l4mesh: `request.*` (HTTP only), `connection.sni`
    /// (l4mesh's clients dial by address and send none; foreign TLS is not inspected), and
    /// `experimental.envoy.filters.*` (metadata of Envoy filters l4mesh does not have).
    Unsupported,
}

impl Key {
    fn parse(key: &str) -> Option<Key> {
        Some(match key {
            "source.principal" => Key::SourcePrincipal,
            "source.namespace" => Key::SourceNamespace,
            "source.serviceAccount" => Key::SourceServiceAccount,
            "source.trustDomain" => Key::SourceTrustDomain,
            "source.ip" => Key::SourceIp,
            "remote.ip" => Key::RemoteIp,
            "destination.ip" => Key::DestinationIp,
            "destination.port" => Key::DestinationPort,
            "connection.sni" => Key::Unsupported,
            k if k.starts_with("request.") || k.starts_with("experimental.envoy.filters.") => {
                Key::Unsupported
            }
            _ => return None,
        })
    }
}

/// One constraint: `values` (any must match, when given) and `notValues` (none may match).
#[derive(Clone, Debug)]
struct Field<T> {
    values: Vec<T>,
    not_values: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            values: Vec::new(),
            not_values: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn new(values: Vec<T>, not_values: Vec<T>) -> Self {
        Field { values, not_values }
    }
    fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }
    fn check(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&matches))
            && !self.not_values.iter().any(&matches)
    }
}

/// A source, operation or condition as written: every L4 constraint it can make (most are
/// empty). Compiled into a [`Matcher`] holding only the ones it makes.
#[derive(Clone, Debug, Default)]
struct Constraints {
    principals: Field<Glob>,
    namespaces: Field<Glob>,
    service_accounts: Field<ServiceAccount>,
    trust_domains: Field<Glob>,
    source_ips: Field<IpNet>,
    remote_ips: Field<IpNet>,
    destination_ips: Field<IpNet>,
    ports: Field<PortRange>,
}

/// One constraint a matcher checks.
#[derive(Clone, Debug)]
enum Check {
    Principals(Field<Glob>),
    Namespaces(Field<Glob>),
    ServiceAccounts(Field<ServiceAccount>),
    TrustDomains(Field<Glob>),
    SourceIps(Field<IpNet>),
    DestinationIps(Field<IpNet>),
    Ports(Field<PortRange>),
}

impl Check {
    fn matches(&self, f: &Facts<'_>) -> bool {
        match self {
            Check::Principals(c) => c.check(|m| m.matches(f.principal)),
            Check::Namespaces(c) => c.check(|m| m.matches(f.namespace)),
            Check::ServiceAccounts(c) => c.check(|sa| {
                f.namespace == Some(sa.0.as_str()) && f.service_account == Some(sa.1.as_str())
            }),
            Check::TrustDomains(c) => c.check(|m| m.matches(f.trust_domain)),
            Check::SourceIps(c) => c.check(|n| n.contains(&f.source_ip)),
            Check::DestinationIps(c) => c.check(|n| n.contains(&f.destination_ip)),
            Check::Ports(c) => c.check(|p| p.contains(f.port)),
        }
    }
}

/// A compiled source, operation or condition: only the constraints it makes, so a decision
/// over many sparse rules costs what they say, not what they could say.
#[derive(Clone, Debug)]
struct Matcher(Vec<Check>);

impl Matcher {
    fn new(c: Constraints) -> Matcher {
        let mut checks = Vec::new();
        let mut add = |empty: bool, check: Check| {
            if !empty {
                checks.push(check);
            }
        };
        add(c.principals.is_empty(), Check::Principals(c.principals));
        add(c.namespaces.is_empty(), Check::Namespaces(c.namespaces));
        add(
            c.service_accounts.is_empty(),
            Check::ServiceAccounts(c.service_accounts),
        );
        add(
            c.trust_domains.is_empty(),
            Check::TrustDomains(c.trust_domains),
        );
        add(c.source_ips.is_empty(), Check::SourceIps(c.source_ips));
        // At L4 there is no X-Forwarded-For or PROXY header: the remote is the peer.
        add(c.remote_ips.is_empty(), Check::SourceIps(c.remote_ips));
        add(
            c.destination_ips.is_empty(),
            Check::DestinationIps(c.destination_ips),
        );
        add(c.ports.is_empty(), Check::Ports(c.ports));
        Matcher(checks)
    }

    fn matches(&self, f: &Facts<'_>) -> bool {
        self.0.iter().all(|c| c.matches(f))
    }
}

/// What the matchers look at, worked out once per decision.
struct Facts<'a> {
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
    trust_domain: Option<&'a str>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    port: u16,
}

impl<'a> Facts<'a> {
    fn of(peer: &Peer<'a>) -> Facts<'a> {
        Facts {
            principal: peer.principal,
            namespace: peer.namespace,
            service_account: peer.service_account,
            trust_domain: peer.principal.and_then(|p| p.split('/').next()),
            source_ip: peer.source_ip.to_canonical(),
            destination_ip: peer.destination.ip().to_canonical(),
            port: peer.destination.port(),
        }
    }
}

#[derive(Clone, Debug)]
struct CompiledRule {
    /// Its place in the policy's `rules`, for reports.
    index: usize,
    /// Any of these (empty = any source).
    from: Vec<Matcher>,
    /// Any of these (empty = any operation).
    to: Vec<Matcher>,
    /// All of these.
    when: Vec<Matcher>,
}

impl CompiledRule {
    fn matches(&self, f: &Facts<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|m| m.matches(f)))
            && (self.to.is_empty() || self.to.iter().any(|m| m.matches(f)))
            && self.when.iter().all(|m| m.matches(f))
    }
}

#[derive(Clone, Debug)]
struct CompiledPolicy {
    id: Arc<str>,
    /// As written (CUSTOM compiles to a DENY).
    action: Action,
    rules: Vec<CompiledRule>,
}

impl CompiledPolicy {
    fn first_match(&self, f: &Facts<'_>) -> Option<Match> {
        self.rules.iter().find(|r| r.matches(f)).map(|r| Match {
            policy: self.id.clone(),
            rule: r.index,
        })
    }
}

/// What an authorization decision is based on.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    /// `trust-domain/ns/NS/sa/SA` (the SPIFFE ID without `spiffe://`); `None` for plaintext.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
}

/// A policy rule that matched: `namespace/name` and the rule's index in `spec.rules`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    pub policy: Arc<str>,
    pub rule: usize,
}

impl std::fmt::Display for Match {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rules[{}]", self.policy, self.rule)
    }
}

/// The verdict, and what decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The ALLOW rule that matched, or `None` when no ALLOW policy applies.
    Allow(Option<Match>),
    /// The DENY (or CUSTOM) rule that matched, or `None` when ALLOW policies apply and none
    /// matched.
    Deny(Option<Match>),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }

    /// The deciding policy as a metric label value (`ns/name`, or what decided without one):
    /// bounded by the number of policies.
    pub fn policy_label(&self) -> &str {
        match self {
            Decision::Allow(Some(m)) | Decision::Deny(Some(m)) => &m.policy,
            Decision::Allow(None) => NO_ALLOW_POLICY,
            Decision::Deny(None) => NO_ALLOW_MATCHED,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Decision::Allow(_) => "allow",
            Decision::Deny(_) => "deny",
        }
    }
}

pub const NO_ALLOW_POLICY: &str = "(no ALLOW policy applies)";
pub const NO_ALLOW_MATCHED: &str = "(no ALLOW policy matched)";

/// What a dry-run policy would have done to a connection, had it been enforced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRun {
    pub policy: Arc<str>,
    /// The rule that matched; `None` for an ALLOW policy that would deny because no rule
    /// of any ALLOW policy matched.
    pub rule: Option<usize>,
    /// `allow`, `deny` or `audit`.
    pub decision: &'static str,
}

/// Everything the policies say about one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// AUDIT rules that matched (they decide nothing).
    pub audits: Vec<Match>,
    /// What dry-run policies would have done (they decide nothing).
    pub dry_run: Vec<DryRun>,
}

/// Why a policy does or does not apply to this workload (for `check --explain`).
#[derive(Clone, Debug, PartialEq)]
pub struct Considered {
    pub id: String,
    pub action: Action,
    pub dry_run: bool,
    /// `Ok(why it applies)` or `Err(why it does not)`.
    pub applies: Result<String, String>,
}

/// The AuthorizationPolicies that apply to one workload, compiled for per-connection use.
#[derive(Clone, Debug, Default)]
pub struct Authorizer {
    /// DENY and CUSTOM policies.
    deny: Vec<CompiledPolicy>,
    allow: Vec<CompiledPolicy>,
    audit: Vec<CompiledPolicy>,
    /// Dry-run policies of every action: evaluated, reported, never enforced.
    dry_run: Vec<CompiledPolicy>,
    /// ALLOW rules whose only constraint is a list of exact principals, by principal: the
    /// common "these service accounts may call me" policy costs one hash lookup however many
    /// of them there are.
    allow_by_principal: HashMap<String, Match>,
    /// The ALLOW policies in force, for "no rule of these matched".
    allow_ids: String,
    /// Things a person should know: fields that cannot be enforced at L4 and what that does,
    /// CUSTOM policies turned into denials.
    pub warnings: Vec<String>,
    /// Every policy looked at, and whether it applies (for `check --explain`).
    pub considered: Vec<Considered>,
}

/// One parsed AuthorizationPolicy with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub spec: Spec,
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    pub dry_run: bool,
}

impl AuthorizationPolicy {
    /// Whether the policy applies to `workload`: `Ok(why)` or `Err(why not)`. Policies in the
    /// root namespace apply mesh-wide (their selector matched in every namespace), others in
    /// their own namespace.
    pub fn applies_to(&self, workload: &Workload, root_namespace: &str) -> Result<String, String> {
        let scope = if self.namespace == root_namespace {
            "root namespace (mesh-wide)".to_string()
        } else if self.namespace == workload.namespace {
            format!("namespace {}", self.namespace)
        } else {
            return Err(format!(
                "another namespace ({}, the workload is in {})",
                self.namespace, workload.namespace
            ));
        };
        match &self.spec.selector {
            Some(s) if !s.match_labels.is_empty() => {
                let labels = labels_text(&s.match_labels);
                if s.matches(&workload.labels) {
                    Ok(format!("{scope}, selector {labels} matches"))
                } else {
                    Err(format!("{scope}, but selector {labels} does not match"))
                }
            }
            _ => Ok(format!("{scope}, no selector")),
        }
    }
}

/// `k=v,k2=v2`, as `kubectl -l` writes a selector.
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Authorizer {
    /// Keeps the policies that apply to `workload` and compiles them.
    pub fn compile(
        policies: &[AuthorizationPolicy],
        workload: &Workload,
        root_namespace: &str,
    ) -> Authorizer {
        let mut out = Authorizer::default();
        for p in policies {
            let applies = p.applies_to(workload, root_namespace);
            out.considered.push(Considered {
                id: format!("{}/{}", p.namespace, p.name),
                action: p.spec.action,
                dry_run: p.dry_run,
                applies: applies.clone(),
            });
            if applies.is_ok() {
                out.add(p, &workload.trust_domains);
            }
        }
        out.allow_ids = out
            .allow
            .iter()
            .map(|p| p.id.as_ref())
            .collect::<Vec<_>>()
            .join(", ");
        out
    }

    fn add(&mut self, p: &AuthorizationPolicy, trust_domains: &TrustDomains) {
        let id: Arc<str> = format!("{}/{}", p.namespace, p.name).into();
        let action = p.spec.action;
        let dry = if p.dry_run { " (dry run)" } else { "" };
        if action == Action::Custom {
            let provider = p
                .spec
                .provider
                .as_ref()
                .and_then(|v| v.get("name"))
                .and_then(|v| v.as_str())
                .unwrap_or("(none)");
            self.warnings.push(format!(
                "AuthorizationPolicy {id}{dry}: action CUSTOM needs extension provider {provider:?}, which l4mesh does not have: connections its rules match are denied"
            ));
        }
        let mut rules = Vec::new();
        for (i, rule) in p.spec.rules.iter().enumerate() {
            let (compiled, unsupported) = compile_rule(i, rule, &p.namespace, trust_domains);
            if !unsupported.is_empty() {
                let fields = unsupported.join(", ");
                self.warnings.push(match action {
                    Action::Allow => format!(
                        "AuthorizationPolicy {id}{dry} rules[{i}]: {fields}: not checkable at L4, so this ALLOW rule never matches"
                    ),
                    _ => format!(
                        "AuthorizationPolicy {id}{dry} rules[{i}]: {fields}: not checkable at L4, so this rule applies on its other fields alone"
                    ),
                });
                if action == Action::Allow {
                    continue;
                }
            }
            if action == Action::Allow && !p.dry_run {
                if let Some(principals) = exact_principals_only(rule, trust_domains) {
                    for pr in principals {
                        self.allow_by_principal.entry(pr).or_insert_with(|| Match {
                            policy: id.clone(),
                            rule: i,
                        });
                    }
                    continue;
                }
            }
            rules.push(compiled);
        }
        let compiled = CompiledPolicy { id, action, rules };
        let list = match (p.dry_run, action) {
            (true, _) => &mut self.dry_run,
            (false, Action::Allow) => &mut self.allow,
            (false, Action::Deny | Action::Custom) => &mut self.deny,
            (false, Action::Audit) => &mut self.audit,
        };
        list.push(compiled);
    }

    /// Decides a connection.
    pub fn decide(&self, peer: &Peer<'_>) -> Verdict {
        let facts = Facts::of(peer);
        let peer = &facts;
        let audits = self
            .audit
            .iter()
            .filter_map(|p| p.first_match(peer))
            .collect();
        let decision = self.enforce(peer);
        let dry_run = if self.dry_run.is_empty() {
            Vec::new()
        } else {
            self.dry_runs(peer)
        };
        Verdict {
            decision,
            audits,
            dry_run,
        }
    }

    fn enforce(&self, peer: &Facts<'_>) -> Decision {
        if let Some(m) = self.deny.iter().find_map(|p| p.first_match(peer)) {
            return Decision::Deny(Some(m));
        }
        if self.allow.is_empty() && self.allow_by_principal.is_empty() {
            return Decision::Allow(None);
        }
        match self.allow_match(peer) {
            Some(m) => Decision::Allow(Some(m)),
            None => Decision::Deny(None),
        }
    }

    fn allow_match(&self, peer: &Facts<'_>) -> Option<Match> {
        let indexed = peer
            .principal
            .and_then(|p| self.allow_by_principal.get(p))
            .cloned();
        indexed.or_else(|| self.allow.iter().find_map(|p| p.first_match(peer)))
    }

    /// Each dry-run policy's would-be decision: a DENY or CUSTOM that matches would deny, an
    /// AUDIT that matches would audit, an ALLOW that matches would allow, and an ALLOW that
    /// does not would deny when no other ALLOW policy (enforced or dry-run) lets the
    /// connection in.
    fn dry_runs(&self, peer: &Facts<'_>) -> Vec<DryRun> {
        let any_allow = self.allow_match(peer).is_some()
            || self
                .dry_run
                .iter()
                .any(|p| p.action == Action::Allow && p.first_match(peer).is_some());
        let mut out = Vec::new();
        for p in &self.dry_run {
            let m = p.first_match(peer);
            let decision = match (p.action, &m) {
                (Action::Allow, Some(_)) => "allow",
                (Action::Allow, None) if !any_allow => "deny",
                (Action::Deny | Action::Custom, Some(_)) => "deny",
                (Action::Audit, Some(_)) => "audit",
                _ => continue,
            };
            out.push(DryRun {
                policy: p.id.clone(),
                rule: m.map(|m| m.rule),
                decision,
            });
        }
        out
    }

    /// Whether `policy` is the id of a policy in force (enforced or dry run), or one of the
    /// decision labels that name none.
    pub fn names(&self, policy: &str) -> bool {
        policy == NO_ALLOW_POLICY
            || policy == NO_ALLOW_MATCHED
            || [&self.deny, &self.allow, &self.audit, &self.dry_run]
                .iter()
                .any(|set| set.iter().any(|p| &*p.id == policy))
    }

    /// How many policies are enforced, by action (for logs and `check`); CUSTOM counts as
    /// DENY.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.allow.len(), self.deny.len(), self.audit.len())
    }

    /// Why a connection no ALLOW rule matched was denied, naming the ALLOW policies in force
    /// (logs, errors, `/refused`, `simulate`).
    pub fn no_allow_matched(&self) -> String {
        format!(
            "no rule of the ALLOW policies in force matched ({})",
            self.allow_ids
        )
    }
}

/// The principals of a rule that says nothing but "one of these exact principals".
fn exact_principals_only(rule: &Rule, trust_domains: &TrustDomains) -> Option<Vec<String>> {
    let [from] = rule.from.as_slice() else {
        return None;
    };
    let only_principals = SourceSpec {
        principals: from.source.principals.clone(),
        ..SourceSpec::default()
    };
    let exact = from.source.principals.iter().all(|p| !p.contains('*'));
    (rule.to.is_empty()
        && rule.when.is_empty()
        && from.source == only_principals
        && exact
        && !from.source.principals.is_empty())
    .then(|| {
        from.source
            .principals
            .iter()
            .flat_map(|p| trust_domains.principals(p))
            .collect()
    })
}

/// Compiles one rule; also returns the fields in it that l4mesh cannot check.
fn compile_rule(
    index: usize,
    rule: &Rule,
    policy_namespace: &str,
    trust_domains: &TrustDomains,
) -> (CompiledRule, Vec<String>) {
    let mut unsupported = Vec::new();
    let principals = |v: &[String]| {
        v.iter()
            .flat_map(|s| trust_domains.principals(s))
            .map(|s| Glob::new(&s))
            .collect::<Vec<_>>()
    };
    let namespaces = |v: &[String]| v.iter().map(|s| Glob::namespace(s)).collect::<Vec<_>>();
    let globs = |v: &[String]| v.iter().map(|s| Glob::new(s)).collect::<Vec<_>>();
    // Values were checked when the file was parsed; one that still fails to parse cannot
    // match anything.
    let accounts = |v: &[String]| {
        v.iter()
            .filter_map(|s| ServiceAccount::parse(s, policy_namespace).ok())
            .collect::<Vec<_>>()
    };
    let nets = |v: &[IpBlock]| v.iter().map(|b| b.0).collect::<Vec<_>>();
    let from = rule
        .from
        .iter()
        .enumerate()
        .map(|(f, from)| {
            let s = &from.source;
            if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
                unsupported.push(format!("from[{f}].source.requestPrincipals (HTTP only)"));
            }
            Matcher::new(Constraints {
                principals: Field::new(principals(&s.principals), principals(&s.not_principals)),
                namespaces: Field::new(namespaces(&s.namespaces), namespaces(&s.not_namespaces)),
                service_accounts: Field::new(
                    accounts(&s.service_accounts),
                    accounts(&s.not_service_accounts),
                ),
                trust_domains: Field::new(globs(&s.trust_domains), globs(&s.not_trust_domains)),
                source_ips: Field::new(nets(&s.ip_blocks), nets(&s.not_ip_blocks)),
                remote_ips: Field::new(nets(&s.remote_ip_blocks), nets(&s.not_remote_ip_blocks)),
                ..Constraints::default()
            })
        })
        .collect();
    let to = rule
        .to
        .iter()
        .enumerate()
        .map(|(t, to)| {
            let o = &to.operation;
            for (name, a, b) in [
                ("hosts", &o.hosts, &o.not_hosts),
                ("methods", &o.methods, &o.not_methods),
                ("paths", &o.paths, &o.not_paths),
            ] {
                if !a.is_empty() || !b.is_empty() {
                    unsupported.push(format!("to[{t}].operation.{name} (HTTP only)"));
                }
            }
            Matcher::new(Constraints {
                ports: Field::new(o.ports.clone(), o.not_ports.clone()),
                ..Constraints::default()
            })
        })
        .collect();
    let when = rule
        .when
        .iter()
        .enumerate()
        .map(|(w, c)| {
            let mut m = Constraints::default();
            let blocks = |v: &[String]| {
                v.iter()
                    .filter_map(|s| s.parse::<IpBlock>().ok())
                    .map(|b| b.0)
                    .collect()
            };
            let ports = |v: &[String]| v.iter().filter_map(|s| s.parse().ok()).collect();
            match Key::parse(&c.key) {
                Some(Key::SourcePrincipal) => {
                    m.principals = Field::new(principals(&c.values), principals(&c.not_values))
                }
                Some(Key::SourceNamespace) => {
                    m.namespaces = Field::new(namespaces(&c.values), namespaces(&c.not_values))
                }
                Some(Key::SourceServiceAccount) => {
                    m.service_accounts = Field::new(accounts(&c.values), accounts(&c.not_values))
                }
                Some(Key::SourceTrustDomain) => {
                    m.trust_domains = Field::new(globs(&c.values), globs(&c.not_values))
                }
                Some(Key::SourceIp) => {
                    m.source_ips = Field::new(blocks(&c.values), blocks(&c.not_values))
                }
                Some(Key::RemoteIp) => {
                    m.remote_ips = Field::new(blocks(&c.values), blocks(&c.not_values))
                }
                Some(Key::DestinationIp) => {
                    m.destination_ips = Field::new(blocks(&c.values), blocks(&c.not_values))
                }
                Some(Key::DestinationPort) => {
                    m.ports = Field::new(ports(&c.values), ports(&c.not_values))
                }
                Some(Key::Unsupported) | None => {
                    unsupported.push(format!("when[{w}] key {}", c.key));
                }
            }
            Matcher::new(m)
        })
        .collect();
    let compiled = CompiledRule {
        index,
        from,
        to,
        when,
    };
    (compiled, unsupported)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const ROOT: &str = "istio-system";

    /// Builds an Authorizer for workload `app=orders` in namespace `shop` from YAML specs.
    fn authorizer(policies: &[(&str, &str, &str)]) -> Authorizer {
        let parsed: Vec<AuthorizationPolicy> = policies
            .iter()
            .map(|(ns, name, spec)| {
                let dry_run = name.starts_with("dry-");
                let value: serde_yaml::Value = serde_yaml::from_str(spec).unwrap();
                let doc = serde_yaml::Value::Mapping(
                    [
                        ("kind".into(), "AuthorizationPolicy".into()),
                        ("spec".into(), value),
                    ]
                    .into_iter()
                    .collect(),
                );
                let refused = crate::policy::validate::document(&doc);
                assert!(refused.is_empty(), "{name}: {refused:?}");
                let spec: Spec = serde_yaml::from_str(spec).unwrap();
                AuthorizationPolicy {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    spec,
                    dry_run,
                }
            })
            .collect();
        Authorizer::compile(&parsed, &orders("cluster.local"), ROOT)
    }

    /// Workload `app=orders` in namespace `shop`.
    fn orders(trust_domain: &str) -> Workload {
        Workload {
            namespace: "shop".into(),
            labels: BTreeMap::from([("app".to_string(), "orders".to_string())]),
            trust_domains: trust_domain.into(),
        }
    }

    fn mtls(principal: &'static str, port: u16) -> Peer<'static> {
        let namespace = principal.split('/').nth(2);
        Peer {
            principal: Some(principal),
            namespace,
            service_account: principal.split('/').nth(4),
            source_ip: "10.0.0.5".parse().unwrap(),
            destination: SocketAddr::new("10.0.0.9".parse().unwrap(), port),
        }
    }

    fn plaintext(ip: &str, port: u16) -> Peer<'static> {
        Peer {
            principal: None,
            namespace: None,
            service_account: None,
            source_ip: ip.parse().unwrap(),
            destination: SocketAddr::new("10.0.0.9".parse().unwrap(), port),
        }
    }

    const PAYMENT: &str = "cluster.local/ns/shop/sa/payment";
    const INTRUDER: &str = "cluster.local/ns/shop/sa/intruder";
    const SLEEP: &str = "cluster.local/ns/default/sa/sleep";

    fn m(policy: &str, rule: usize) -> Match {
        Match {
            policy: policy.into(),
            rule,
        }
    }

    fn allowed(a: &Authorizer, peer: Peer<'_>) -> bool {
        a.decide(&peer).decision.is_allowed()
    }

    #[test]
    fn no_policy_allows_and_empty_spec_denies_everything() {
        assert!(allowed(&authorizer(&[]), plaintext("1.1.1.1", 80)));
        // Istio's "deny-all": an ALLOW policy with no rules.
        let a = authorizer(&[("shop", "deny-all", "{}")]);
        assert!(!allowed(&a, mtls(PAYMENT, 80)));
        assert_eq!(a.decide(&mtls(PAYMENT, 80)).decision, Decision::Deny(None));
        // Istio's "allow-all": one empty rule.
        let a = authorizer(&[("shop", "allow-all", "rules: [{}]")]);
        assert!(allowed(&a, plaintext("1.1.1.1", 80)));
        // A DENY with no rules is refused by istiod (and the policy file); with an empty
        // rule it denies everything.
        assert!(!allowed(
            &authorizer(&[("shop", "d", "action: DENY\nrules: [{}]")]),
            mtls(PAYMENT, 80)
        ));
    }

    #[test]
    fn allow_by_principal_and_port() {
        let a = authorizer(&[(
            "shop",
            "orders",
            "selector: {matchLabels: {app: orders}}\nrules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/sa/payment\"]\n  to:\n  - operation:\n      ports: [\"8080\"]\n",
        )]);
        assert!(allowed(&a, mtls(PAYMENT, 8080)));
        assert!(!allowed(&a, mtls(INTRUDER, 8080)));
        assert!(!allowed(&a, mtls(PAYMENT, 9090)));
        assert!(!allowed(&a, plaintext("10.0.0.5", 8080)));
    }

    #[test]
    fn selector_and_namespace_scope() {
        let spec = "selector: {matchLabels: {app: other}}\n";
        // Selects another app: does not apply, so no ALLOW policy applies.
        assert!(allowed(
            &authorizer(&[("shop", "x", spec)]),
            mtls(INTRUDER, 80)
        ));
        // Another namespace: does not apply.
        assert!(allowed(
            &authorizer(&[("web", "x", "{}")]),
            mtls(INTRUDER, 80)
        ));
        // The root namespace: applies mesh-wide.
        assert!(!allowed(
            &authorizer(&[(ROOT, "x", "{}")]),
            mtls(INTRUDER, 80)
        ));
    }

    #[test]
    fn istio_documentation_examples() {
        // "allow-read": from sleep or namespace test, GET/HEAD only. HTTP-only operation: at
        // L4 the ALLOW rule never matches, so nothing is allowed.
        let a = authorizer(&[(
            "shop",
            "allow-read",
            "action: ALLOW\nrules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/default/sa/sleep\"]\n  - source:\n      namespaces: [\"test\"]\n  to:\n  - operation:\n      methods: [\"GET\", \"HEAD\"]\n",
        )]);
        assert!(!allowed(&a, mtls(SLEEP, 80)));
        assert!(a.warnings[0].contains("never matches"), "{:?}", a.warnings);
        // "deny POST from sleep": at L4 the DENY applies on its L4 part (fail closed).
        let a = authorizer(&[(
            "shop",
            "deny-post",
            "action: DENY\nrules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/default/sa/sleep\"]\n  to:\n  - operation:\n      methods: [\"POST\"]\n",
        )]);
        assert!(!allowed(&a, mtls(SLEEP, 80)));
        assert!(allowed(&a, mtls(PAYMENT, 80)));
        assert!(a.warnings[0].contains("other fields alone"));
        // "require mTLS": DENY notPrincipals ["*"] refuses plaintext, lets any mTLS peer in.
        let a = authorizer(&[(
            "shop",
            "require-mtls",
            "action: DENY\nrules:\n- from:\n  - source:\n      notPrincipals: [\"*\"]\n",
        )]);
        assert!(!allowed(&a, plaintext("10.0.0.5", 80)));
        assert!(allowed(&a, mtls(INTRUDER, 80)));
        // "allow from namespace foo" with principals ["*"]-style wildcards.
        let a = authorizer(&[(
            "shop",
            "ns",
            "rules:\n- from:\n  - source:\n      namespaces: [\"shop\"]\n",
        )]);
        assert!(allowed(&a, mtls(INTRUDER, 80)));
        assert!(!allowed(&a, mtls(SLEEP, 80)));
        assert!(
            !allowed(&a, plaintext("10.0.0.5", 80)),
            "plaintext has no namespace"
        );
        // ipBlocks with a bare address and a CIDR; notIpBlocks carve out.
        let a = authorizer(&[(
            "shop",
            "ips",
            "rules:\n- from:\n  - source:\n      ipBlocks: [\"1.2.3.4\", \"5.6.7.0/24\"]\n      notIpBlocks: [\"5.6.7.8\"]\n",
        )]);
        assert!(allowed(&a, plaintext("1.2.3.4", 80)));
        assert!(allowed(&a, plaintext("5.6.7.1", 80)));
        assert!(!allowed(&a, plaintext("5.6.7.8", 80)));
        assert!(!allowed(&a, plaintext("1.2.3.5", 80)));
        // remoteIpBlocks: at L4 the remote is the peer.
        let a = authorizer(&[(
            "shop",
            "remote",
            "action: DENY\nrules:\n- from:\n  - source:\n      remoteIpBlocks: [\"10.0.0.0/24\"]\n",
        )]);
        assert!(!allowed(&a, plaintext("10.0.0.5", 80)));
        assert!(allowed(&a, plaintext("10.0.1.5", 80)));
    }

    #[test]
    fn wildcard_principals_and_not_fields() {
        let a = authorizer(&[(
            "shop",
            "w",
            "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/*\"]\n      notPrincipals: [\"*/sa/intruder\"]\n  to:\n  - operation:\n      notPorts: [\"9090\"]\n",
        )]);
        assert!(allowed(&a, mtls(PAYMENT, 8080)));
        assert!(
            !allowed(&a, mtls(INTRUDER, 8080)),
            "notPrincipals suffix wildcard"
        );
        assert!(!allowed(&a, mtls(PAYMENT, 9090)), "notPorts");
        assert!(!allowed(&a, mtls(SLEEP, 8080)), "prefix wildcard");
        // principals: ["*"] means any authenticated peer.
        let a = authorizer(&[(
            "shop",
            "any",
            "rules:\n- from:\n  - source:\n      principals: [\"*\"]\n",
        )]);
        assert!(allowed(&a, mtls(SLEEP, 1)));
        assert!(!allowed(&a, plaintext("10.0.0.5", 1)));
        let a = authorizer(&[(
            "shop",
            "nn",
            "rules:\n- from:\n  - source:\n      notNamespaces: [\"default\"]\n",
        )]);
        assert!(allowed(&a, mtls(PAYMENT, 1)));
        assert!(!allowed(&a, mtls(SLEEP, 1)));
        assert!(
            allowed(&a, plaintext("10.0.0.5", 1)),
            "no namespace is not `default`"
        );
    }

    #[test]
    fn when_conditions() {
        let a = authorizer(&[(
            "shop",
            "when",
            "rules:\n- when:\n  - key: source.principal\n    values: [\"cluster.local/ns/shop/sa/payment\"]\n  - key: destination.port\n    notValues: [\"9090\"]\n  - key: source.ip\n    values: [\"10.0.0.0/8\"]\n",
        )]);
        assert!(allowed(&a, mtls(PAYMENT, 8080)));
        assert!(!allowed(&a, mtls(PAYMENT, 9090)));
        assert!(!allowed(&a, mtls(INTRUDER, 8080)));
        // request.* conditions are HTTP-only.
        let a = authorizer(&[(
            "shop",
            "jwt",
            "rules:\n- when:\n  - key: request.auth.claims[iss]\n    values: [\"https://issuer\"]\n",
        )]);
        assert!(!allowed(&a, mtls(PAYMENT, 1)));
        // source.namespace
        let a = authorizer(&[(
            "shop",
            "ns",
            "rules:\n- when:\n  - key: source.namespace\n    values: [\"default\"]\n",
        )]);
        assert!(allowed(&a, mtls(SLEEP, 1)));
        assert!(!allowed(&a, mtls(PAYMENT, 1)));
    }

    #[test]
    fn deny_overrides_allow_and_audit_decides_nothing() {
        let a = authorizer(&[
            ("shop", "allow-all", "rules: [{}]"),
            (
                "shop",
                "deny-intruder",
                "action: DENY\nrules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/sa/intruder\"]\n",
            ),
            ("shop", "audit-everything", "action: AUDIT\nrules: [{}]"),
        ]);
        let v = a.decide(&mtls(INTRUDER, 80));
        assert_eq!(v.decision, Decision::Deny(Some(m("shop/deny-intruder", 0))));
        assert_eq!(v.audits, vec![m("shop/audit-everything", 0)]);
        let v = a.decide(&mtls(PAYMENT, 80));
        assert_eq!(v.decision, Decision::Allow(Some(m("shop/allow-all", 0))));
        // AUDIT alone: allowed.
        assert!(allowed(
            &authorizer(&[("shop", "a", "action: AUDIT\nrules: [{}]")]),
            mtls(INTRUDER, 1)
        ));
    }

    #[test]
    fn the_exact_principal_index_agrees_with_the_rules() {
        let a = authorizer(&[(
            "shop",
            "sas",
            "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/sa/payment\", \"cluster.local/ns/default/sa/sleep\"]\n",
        )]);
        assert_eq!(a.allow_by_principal.len(), 2);
        assert_eq!(
            a.decide(&mtls(PAYMENT, 1)).decision,
            Decision::Allow(Some(m("shop/sas", 0)))
        );
        assert!(allowed(&a, mtls(SLEEP, 1)));
        assert!(!allowed(&a, mtls(INTRUDER, 1)));
        assert!(!allowed(&a, plaintext("10.0.0.5", 1)));
    }

    /// Istio's TCP semantics for CUSTOM with a provider l4mesh does not have: the connections
    /// its rules match are denied, the others are not affected.
    #[test]
    fn custom_denies_what_its_rules_match() {
        let a = authorizer(&[(
            "shop",
            "ext",
            // istiod refuses identity fields in a CUSTOM source; addresses and ports it takes.
            "action: CUSTOM\nprovider: {name: opa}\nrules:\n- to:\n  - operation:\n      ports: [\"80\"]\n",
        )]);
        assert_eq!(
            a.decide(&mtls(SLEEP, 80)).decision,
            Decision::Deny(Some(m("shop/ext", 0)))
        );
        assert!(allowed(&a, mtls(SLEEP, 81)));
        assert!(a.warnings[0].contains("CUSTOM needs extension provider \"opa\""));
        // With an HTTP-only rule: applies on its L4 fields (fails closed).
        let a = authorizer(&[(
            "shop",
            "ext",
            "action: CUSTOM\nprovider: {name: opa}\nrules:\n- to:\n  - operation:\n      paths: [\"/admin\"]\n",
        )]);
        assert!(!allowed(&a, mtls(PAYMENT, 80)));
    }

    /// `source.trustDomain` (a condition istiod accepts) matches the peer's trust domain.
    #[test]
    fn a_trust_domain_condition_matches_the_peers_domain() {
        let a = authorizer(&[(
            "shop",
            "td",
            "rules:\n- when:\n  - key: source.trustDomain\n    values: [\"cluster.local\"]\n",
        )]);
        assert!(allowed(&a, mtls(SLEEP, 80)));
        assert!(!allowed(&a, mtls("other.td/ns/default/sa/sleep", 80)));
        assert!(!allowed(&a, plaintext("10.0.0.5", 80)));
    }

    #[test]
    fn service_accounts_match_namespace_and_name() {
        let a = authorizer(&[(
            "shop",
            "sa",
            "rules:\n- from:\n  - source:\n      serviceAccounts: [\"payment\", \"default/sleep\"]\n",
        )]);
        assert!(allowed(&a, mtls(PAYMENT, 1)), "`payment` is shop/payment");
        assert!(allowed(&a, mtls(SLEEP, 1)));
        assert!(!allowed(&a, mtls(INTRUDER, 1)));
        assert!(!allowed(&a, mtls("cluster.local/ns/default/sa/payment", 1)));
        assert!(!allowed(&a, plaintext("10.0.0.5", 1)));
        let a = authorizer(&[(
            "shop",
            "not-sa",
            "action: DENY\nrules:\n- from:\n  - source:\n      notServiceAccounts: [\"payment\"]\n",
        )]);
        assert!(allowed(&a, mtls(PAYMENT, 1)));
        assert!(!allowed(&a, mtls(INTRUDER, 1)));
        let a = authorizer(&[(
            "shop",
            "when-sa",
            "rules:\n- when:\n  - key: source.serviceAccount\n    values: [\"default/sleep\"]\n",
        )]);
        assert!(allowed(&a, mtls(SLEEP, 1)));
        assert!(!allowed(&a, mtls(PAYMENT, 1)));
        let a = authorizer(&[(
            "shop",
            "td",
            "rules:\n- from:\n  - source:\n      trustDomains: [\"cluster.*\"]\n",
        )]);
        assert!(allowed(&a, mtls(SLEEP, 1)));
        assert!(!allowed(&a, mtls("other.org/ns/shop/sa/payment", 1)));
    }

    /// `connection.sni`, `experimental.envoy.filters.*` and `request.*` are valid Istio but
    /// not checkable here: an ALLOW rule naming one never matches, a DENY rule applies on its
    /// other fields, and the warning names the field.
    #[test]
    fn conditions_l4mesh_cannot_check_fail_closed() {
        for key in [
            "connection.sni",
            "experimental.envoy.filters.network.mysql_proxy[db.table]",
            "request.headers[x-user]",
        ] {
            let a = authorizer(&[(
                "shop",
                "allow",
                &format!("rules:\n- when:\n  - key: {key}\n    values: [x]\n"),
            )]);
            assert!(!allowed(&a, mtls(PAYMENT, 1)), "{key}");
            assert!(
                a.warnings[0].contains(&format!("when[0] key {key}")),
                "{:?}",
                a.warnings
            );
            assert!(a.warnings[0].contains("never matches"));
            let a = authorizer(&[(
                "shop",
                "deny",
                &format!("action: DENY\nrules:\n- from:\n  - source:\n      namespaces: [default]\n  when:\n  - key: {key}\n    values: [x]\n"),
            )]);
            assert!(!allowed(&a, mtls(SLEEP, 1)), "{key}");
            assert!(allowed(&a, mtls(PAYMENT, 1)), "{key}");
        }
    }

    /// A policy written for `cluster.local` keeps working in a mesh whose trust domain is
    /// another: before, its ALLOW never matched and, worse, its DENY never fired.
    #[test]
    fn cluster_local_principals_mean_the_local_trust_domain() {
        let policies: Vec<AuthorizationPolicy> = [
            ("allow", "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/sa/payment\"]\n"),
            ("deny", "action: DENY\nrules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/sa/intruder\"]\n"),
            ("deny-when", "action: DENY\nrules:\n- when:\n  - key: source.principal\n    values: [\"cluster.local/ns/default/sa/sleep\"]\n"),
        ]
        .iter()
        .map(|(name, spec)| AuthorizationPolicy {
            name: name.to_string(),
            namespace: "shop".into(),
            spec: serde_yaml::from_str(spec).unwrap(),
            dry_run: false,
        })
        .collect();
        let a = Authorizer::compile(&policies, &orders("example.org"), ROOT);
        assert!(allowed(&a, mtls("example.org/ns/shop/sa/payment", 1)));
        assert_eq!(
            a.decide(&mtls("example.org/ns/shop/sa/intruder", 1))
                .decision,
            Decision::Deny(Some(m("shop/deny", 0)))
        );
        assert_eq!(
            a.decide(&mtls("example.org/ns/default/sa/sleep", 1))
                .decision,
            Decision::Deny(Some(m("shop/deny-when", 0)))
        );
        // Another trust domain is not this mesh's.
        assert!(!allowed(&a, mtls("other.org/ns/shop/sa/payment", 1)));

        // Mid-migration to new.org with old.org as an alias: the same policies (and ones
        // naming the old domain) allow and deny the workload whichever certificate it holds.
        let mut workload = orders("new.org");
        workload.trust_domains = TrustDomains::new("new.org", &["old.org".to_string()]);
        let mut policies = policies;
        policies.push(AuthorizationPolicy {
            name: "allow-old".into(),
            namespace: "shop".into(),
            spec: serde_yaml::from_str("rules:\n- from:\n  - source:\n      principals: [\"old.org/ns/shop/sa/web\"]\n  to:\n  - operation:\n      ports: [\"8080\"]\n").unwrap(),
            dry_run: false,
        });
        let a = Authorizer::compile(&policies, &workload, ROOT);
        for td in ["new.org", "old.org"] {
            let p = |who: &str| -> &'static str { format!("{td}/ns/{who}").leak() };
            assert!(allowed(&a, mtls(p("shop/sa/payment"), 1)), "{td}");
            assert!(allowed(&a, mtls(p("shop/sa/web"), 8080)), "{td}");
            assert!(!allowed(&a, mtls(p("shop/sa/web"), 9090)), "{td}");
            assert_eq!(
                a.decide(&mtls(p("shop/sa/intruder"), 1)).decision,
                Decision::Deny(Some(m("shop/deny", 0))),
                "{td}"
            );
            assert_eq!(
                a.decide(&mtls(p("default/sa/sleep"), 1)).decision,
                Decision::Deny(Some(m("shop/deny-when", 0))),
                "{td}"
            );
        }
        assert!(!allowed(&a, mtls("other.org/ns/shop/sa/payment", 1)));
    }

    #[test]
    fn namespaces_with_a_star_in_the_middle() {
        let a = authorizer(&[(
            "shop",
            "eu",
            "rules:\n- from:\n  - source:\n      namespaces: [\"prod-*-eu\"]\n",
        )]);
        assert!(allowed(&a, mtls("cluster.local/ns/prod-web-eu/sa/x", 1)));
        assert!(!allowed(&a, mtls("cluster.local/ns/prod-web-us/sa/x", 1)));
    }

    #[test]
    fn no_allow_match_names_the_policies_in_force_and_the_rule() {
        let a = authorizer(&[
            ("shop", "a", "rules:\n- from:\n  - source:\n      namespaces: [x]\n- to:\n  - operation:\n      ports: [\"8080\"]\n"),
            ("shop", "b", "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/sa/payment\"]\n"),
        ]);
        assert_eq!(a.decide(&mtls(SLEEP, 1)).decision, Decision::Deny(None));
        assert_eq!(
            a.no_allow_matched(),
            "no rule of the ALLOW policies in force matched (shop/a, shop/b)"
        );
        assert_eq!(
            a.decide(&mtls(SLEEP, 8080)).decision,
            Decision::Allow(Some(m("shop/a", 1)))
        );
    }

    /// `istio.io/dry-run`: evaluated and reported, never enforced.
    #[test]
    fn dry_run_policies_report_and_never_decide() {
        let a = authorizer(&[(
            "shop",
            "dry-deny",
            "action: DENY\nrules:\n- from:\n  - source:\n      namespaces: [default]\n",
        )]);
        let v = a.decide(&mtls(SLEEP, 1));
        assert_eq!(v.decision, Decision::Allow(None), "not enforced");
        assert_eq!(
            v.dry_run,
            vec![DryRun {
                policy: "shop/dry-deny".into(),
                rule: Some(0),
                decision: "deny"
            }]
        );
        assert!(a.decide(&mtls(PAYMENT, 1)).dry_run.is_empty());
        assert_eq!(a.counts(), (0, 0, 0));
        // A dry-run ALLOW: allows what it matches, would deny the rest.
        let a = authorizer(&[(
            "shop",
            "dry-allow",
            "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/sa/payment\"]\n",
        )]);
        let v = a.decide(&mtls(PAYMENT, 1));
        assert_eq!(
            (v.decision.is_allowed(), v.dry_run[0].decision),
            (true, "allow")
        );
        let v = a.decide(&mtls(SLEEP, 1));
        assert_eq!(
            (v.decision.is_allowed(), v.dry_run[0].decision),
            (true, "deny")
        );
        assert_eq!(v.dry_run[0].rule, None);
        // ... unless an enforced ALLOW lets it in.
        let a = authorizer(&[
            ("shop", "dry-allow", "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/sa/payment\"]\n"),
            ("shop", "all", "rules: [{}]"),
        ]);
        assert!(a.decide(&mtls(SLEEP, 1)).dry_run.is_empty());
    }
}
