//! Authorization: who may connect to this workload, from Istio `AuthorizationPolicy` resources
//! (their L4 subset). Parsed with the rest of the policy file, compiled once per reload into an
//! [`Authorizer`] holding only the policies that apply to this workload, and consulted by
//! `inbound` for every connection before a byte reaches the application.
//!
//! Istio's evaluation: AUDIT policies only log; any matching DENY denies; with no ALLOW policy
//! the connection is allowed; otherwise it is allowed only if some ALLOW rule matches.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::Deserialize;

use crate::identity::spiffe::Glob;
use crate::parse::PortRange;

/// What a policy does when one of its rules matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

/// One `AuthorizationPolicy`, as written.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default = "allow")]
    pub action: Action,
    /// Only meaningful with CUSTOM, which l4mesh refuses.
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
    pub match_labels: std::collections::BTreeMap<String, String>,
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

/// Parses the `spec` of an AuthorizationPolicy document and rejects what l4mesh cannot do.
pub fn check_spec(spec: &Spec) -> Result<(), String> {
    if spec.action == Action::Custom {
        return Err(
            "spec.action: CUSTOM (an external authorizer) is not supported by l4mesh".to_string(),
        );
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        for (c, cond) in rule.when.iter().enumerate() {
            let at = format!("spec.rules[{r}].when[{c}]");
            let key = Key::parse(&cond.key).ok_or_else(|| {
                format!("{at}.key: {:?} is not a condition l4mesh knows", cond.key)
            })?;
            for (field, list) in [("values", &cond.values), ("notValues", &cond.not_values)] {
                for (i, v) in list.iter().enumerate() {
                    key.check_value(v)
                        .map_err(|e| format!("{at}.{field}[{i}]: {e}"))?;
                }
            }
        }
    }
    Ok(())
}

/// A `when` key l4mesh can evaluate, or one only an HTTP proxy can.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    SourcePrincipal,
    SourceNamespace,
    SourceIp,
    RemoteIp,
    DestinationIp,
    DestinationPort,
    /// `request.*` and friends: never checkable at L4.
    Http,
}

impl Key {
    fn parse(key: &str) -> Option<Key> {
        Some(match key {
            "source.principal" => Key::SourcePrincipal,
            "source.namespace" => Key::SourceNamespace,
            "source.ip" => Key::SourceIp,
            "remote.ip" => Key::RemoteIp,
            "destination.ip" => Key::DestinationIp,
            "destination.port" => Key::DestinationPort,
            k if k.starts_with("request.") || k == "experimental.envoy.filters.http" => Key::Http,
            _ => return None,
        })
    }

    fn check_value(self, v: &str) -> Result<(), String> {
        match self {
            Key::SourceIp | Key::RemoteIp | Key::DestinationIp => v.parse::<IpBlock>().map(|_| ()),
            Key::DestinationPort => v.parse::<PortRange>().map(|_| ()),
            _ => Ok(()),
        }
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
    fn check(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&matches))
            && !self.not_values.iter().any(&matches)
    }
}

/// A compiled source, operation or condition: the L4 parts, and whether HTTP-only parts were
/// present.
#[derive(Clone, Debug, Default)]
struct Matcher {
    principals: Field<Glob>,
    namespaces: Field<Glob>,
    source_ips: Field<IpNet>,
    remote_ips: Field<IpNet>,
    destination_ips: Field<IpNet>,
    ports: Field<PortRange>,
}

impl Matcher {
    fn matches(&self, peer: &Peer<'_>) -> bool {
        let src = peer.source_ip.to_canonical();
        let dst = peer.destination.ip().to_canonical();
        self.principals.check(|m| m.matches(peer.principal))
            && self.namespaces.check(|m| m.matches(peer.namespace))
            && self.source_ips.check(|n| n.contains(&src))
            // At L4 there is no X-Forwarded-For or PROXY header: the remote is the peer.
            && self.remote_ips.check(|n| n.contains(&src))
            && self.destination_ips.check(|n| n.contains(&dst))
            && self.ports.check(|p| p.contains(peer.destination.port()))
    }
}

#[derive(Clone, Debug)]
struct CompiledRule {
    /// Any of these (empty = any source).
    from: Vec<Matcher>,
    /// Any of these (empty = any operation).
    to: Vec<Matcher>,
    /// All of these.
    when: Vec<Matcher>,
    /// The rule names HTTP-only fields.
    http: bool,
}

impl CompiledRule {
    fn matches(&self, peer: &Peer<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|m| m.matches(peer)))
            && (self.to.is_empty() || self.to.iter().any(|m| m.matches(peer)))
            && self.when.iter().all(|m| m.matches(peer))
    }
}

#[derive(Clone, Debug)]
struct CompiledPolicy {
    id: String,
    rules: Vec<CompiledRule>,
}

/// What an authorization decision is based on.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    /// `trust-domain/ns/NS/sa/SA` (the SPIFFE ID without `spiffe://`); `None` for plaintext.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
}

/// The verdict, and the policy that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `policy` is the ALLOW policy that matched, or `None` when no ALLOW policy applies.
    Allow { policy: Option<String> },
    /// `policy` is the DENY policy that matched, or `None` when ALLOW policies apply and none
    /// matched.
    Deny { policy: Option<String> },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
    /// The deciding policy as a label value (`ns/name`, or what decided without one).
    pub fn policy_label(&self) -> &str {
        match self {
            Decision::Allow { policy: Some(p) } | Decision::Deny { policy: Some(p) } => p,
            Decision::Allow { policy: None } => "(no ALLOW policy applies)",
            Decision::Deny { policy: None } => "(no ALLOW policy matched)",
        }
    }
}

/// The AuthorizationPolicies that apply to one workload, compiled for per-connection use.
#[derive(Clone, Debug, Default)]
pub struct Authorizer {
    deny: Vec<CompiledPolicy>,
    allow: Vec<CompiledPolicy>,
    audit: Vec<CompiledPolicy>,
    /// ALLOW rules whose only constraint is a list of exact principals, by principal: the
    /// common "these service accounts may call me" policy costs one hash lookup however many
    /// of them there are.
    allow_by_principal: HashMap<String, String>,
    /// Things a person should know: HTTP-only fields that cannot be enforced at L4.
    pub warnings: Vec<String>,
}

/// One parsed AuthorizationPolicy with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub spec: Spec,
}

impl Authorizer {
    /// Keeps the policies that apply to a workload in `namespace` with `labels`: those in the
    /// root namespace (mesh-wide, selector matched in every namespace) and in its own.
    pub fn compile(
        policies: &[AuthorizationPolicy],
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
        root_namespace: &str,
    ) -> Authorizer {
        let mut out = Authorizer::default();
        for p in policies {
            let in_scope = p.namespace == root_namespace || p.namespace == namespace;
            let selected = p
                .spec
                .selector
                .as_ref()
                .is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)));
            if !(in_scope && selected) {
                continue;
            }
            let id = format!("{}/{}", p.namespace, p.name);
            let mut rules = Vec::new();
            for (i, rule) in p.spec.rules.iter().enumerate() {
                let compiled = compile_rule(rule);
                if compiled.http {
                    out.warnings.push(match p.spec.action {
                        Action::Allow => format!(
                            "AuthorizationPolicy {id} rules[{i}] uses HTTP-only fields: an L4 proxy cannot check them, so this ALLOW rule never matches"
                        ),
                        _ => format!(
                            "AuthorizationPolicy {id} rules[{i}] uses HTTP-only fields: an L4 proxy cannot check them, so this rule applies on its L4 fields alone"
                        ),
                    });
                    if p.spec.action == Action::Allow {
                        continue;
                    }
                }
                if p.spec.action == Action::Allow {
                    if let Some(principals) = exact_principals_only(rule) {
                        for pr in principals {
                            out.allow_by_principal
                                .entry(pr)
                                .or_insert_with(|| id.clone());
                        }
                        continue;
                    }
                }
                rules.push(compiled);
            }
            let compiled = CompiledPolicy { id, rules };
            match p.spec.action {
                Action::Allow => out.allow.push(compiled),
                Action::Deny => out.deny.push(compiled),
                Action::Audit => out.audit.push(compiled),
                Action::Custom => {} // refused when the file is parsed
            }
        }
        out
    }

    /// Decides a connection; also returns the AUDIT policies that matched (they decide nothing).
    pub fn decide(&self, peer: &Peer<'_>) -> (Decision, Vec<&str>) {
        let audits = matching(&self.audit, peer).collect();
        if let Some(id) = matching(&self.deny, peer).next() {
            return (
                Decision::Deny {
                    policy: Some(id.to_string()),
                },
                audits,
            );
        }
        if self.allow.is_empty() {
            return (Decision::Allow { policy: None }, audits);
        }
        let indexed = peer.principal.and_then(|p| self.allow_by_principal.get(p));
        let allowed = indexed
            .map(String::as_str)
            .or_else(|| matching(&self.allow, peer).next());
        let decision = match allowed {
            Some(id) => Decision::Allow {
                policy: Some(id.to_string()),
            },
            None => Decision::Deny { policy: None },
        };
        (decision, audits)
    }

    /// How many policies apply, by action (for logs and `check`).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.allow.len(), self.deny.len(), self.audit.len())
    }
}

fn matching<'a, 'p, 'q>(
    policies: &'a [CompiledPolicy],
    peer: &'p Peer<'q>,
) -> impl Iterator<Item = &'a str> + use<'a, 'p, 'q> {
    policies
        .iter()
        .filter(move |p| p.rules.iter().any(|r| r.matches(peer)))
        .map(|p| p.id.as_str())
}

/// The principals of a rule that says nothing but "one of these exact principals".
fn exact_principals_only(rule: &Rule) -> Option<Vec<String>> {
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
    .then(|| from.source.principals.clone())
}

fn compile_rule(rule: &Rule) -> CompiledRule {
    let mut http = false;
    let strs = |v: &[String]| v.iter().map(|s| Glob::new(s)).collect::<Vec<_>>();
    let nets = |v: &[IpBlock]| v.iter().map(|b| b.0).collect::<Vec<_>>();
    let from = rule
        .from
        .iter()
        .map(|f| {
            let s = &f.source;
            http |= !s.request_principals.is_empty() || !s.not_request_principals.is_empty();
            Matcher {
                principals: Field::new(strs(&s.principals), strs(&s.not_principals)),
                namespaces: Field::new(strs(&s.namespaces), strs(&s.not_namespaces)),
                source_ips: Field::new(nets(&s.ip_blocks), nets(&s.not_ip_blocks)),
                remote_ips: Field::new(nets(&s.remote_ip_blocks), nets(&s.not_remote_ip_blocks)),
                ..Matcher::default()
            }
        })
        .collect();
    let to = rule
        .to
        .iter()
        .map(|t| {
            let o = &t.operation;
            http |= [
                &o.hosts,
                &o.not_hosts,
                &o.methods,
                &o.not_methods,
                &o.paths,
                &o.not_paths,
            ]
            .iter()
            .any(|v| !v.is_empty());
            Matcher {
                ports: Field::new(o.ports.clone(), o.not_ports.clone()),
                ..Matcher::default()
            }
        })
        .collect();
    let when = rule
        .when
        .iter()
        .map(|c| {
            let mut m = Matcher::default();
            // Values were checked when the file was parsed; one that still fails to parse
            // cannot match anything.
            let blocks = |v: &[String]| {
                v.iter()
                    .filter_map(|s| s.parse::<IpBlock>().ok())
                    .map(|b| b.0)
                    .collect()
            };
            let ports = |v: &[String]| v.iter().filter_map(|s| s.parse().ok()).collect();
            match Key::parse(&c.key) {
                Some(Key::SourcePrincipal) => {
                    m.principals = Field::new(strs(&c.values), strs(&c.not_values))
                }
                Some(Key::SourceNamespace) => {
                    m.namespaces = Field::new(strs(&c.values), strs(&c.not_values))
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
                Some(Key::Http) | None => http = true,
            }
            m
        })
        .collect();
    CompiledRule {
        from,
        to,
        when,
        http,
    }
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
                let spec: Spec = serde_yaml::from_str(spec).unwrap();
                check_spec(&spec).unwrap();
                AuthorizationPolicy {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    spec,
                }
            })
            .collect();
        let labels = BTreeMap::from([("app".to_string(), "orders".to_string())]);
        Authorizer::compile(&parsed, "shop", &labels, ROOT)
    }

    fn mtls(principal: &'static str, port: u16) -> Peer<'static> {
        let namespace = principal.split('/').nth(2);
        Peer {
            principal: Some(principal),
            namespace,
            source_ip: "10.0.0.5".parse().unwrap(),
            destination: SocketAddr::new("10.0.0.9".parse().unwrap(), port),
        }
    }

    fn plaintext(ip: &str, port: u16) -> Peer<'static> {
        Peer {
            principal: None,
            namespace: None,
            source_ip: ip.parse().unwrap(),
            destination: SocketAddr::new("10.0.0.9".parse().unwrap(), port),
        }
    }

    const PAYMENT: &str = "cluster.local/ns/shop/sa/payment";
    const INTRUDER: &str = "cluster.local/ns/shop/sa/intruder";
    const SLEEP: &str = "cluster.local/ns/default/sa/sleep";

    fn allowed(a: &Authorizer, peer: Peer<'_>) -> bool {
        a.decide(&peer).0.is_allowed()
    }

    #[test]
    fn no_policy_allows_and_empty_spec_denies_everything() {
        assert!(allowed(&authorizer(&[]), plaintext("1.1.1.1", 80)));
        // Istio's "deny-all": an ALLOW policy with no rules.
        let a = authorizer(&[("shop", "deny-all", "{}")]);
        assert!(!allowed(&a, mtls(PAYMENT, 80)));
        assert_eq!(
            a.decide(&mtls(PAYMENT, 80)).0,
            Decision::Deny { policy: None }
        );
        // Istio's "allow-all": one empty rule.
        let a = authorizer(&[("shop", "allow-all", "rules: [{}]")]);
        assert!(allowed(&a, plaintext("1.1.1.1", 80)));
        // A DENY with no rules matches nothing.
        assert!(allowed(
            &authorizer(&[("shop", "d", "action: DENY")]),
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
        assert!(a.warnings[0].contains("L4 fields alone"));
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
        let (d, audits) = a.decide(&mtls(INTRUDER, 80));
        assert_eq!(
            d,
            Decision::Deny {
                policy: Some("shop/deny-intruder".into())
            }
        );
        assert_eq!(audits, vec!["shop/audit-everything"]);
        let (d, _) = a.decide(&mtls(PAYMENT, 80));
        assert_eq!(
            d,
            Decision::Allow {
                policy: Some("shop/allow-all".into())
            }
        );
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
            a.decide(&mtls(PAYMENT, 1)).0,
            Decision::Allow {
                policy: Some("shop/sas".into())
            }
        );
        assert!(allowed(&a, mtls(SLEEP, 1)));
        assert!(!allowed(&a, mtls(INTRUDER, 1)));
        assert!(!allowed(&a, plaintext("10.0.0.5", 1)));
    }

    #[test]
    fn unsupported_things_are_refused() {
        let bad =
            |spec: &str| check_spec(&serde_yaml::from_str::<Spec>(spec).unwrap()).unwrap_err();
        assert!(bad("action: CUSTOM\nprovider: {name: ext}").contains("CUSTOM"));
        assert!(
            bad("rules:\n- when:\n  - key: connection.sni\n    values: [x]\n")
                .contains("spec.rules[0].when[0].key")
        );
        assert!(
            bad("rules:\n- when:\n  - key: destination.port\n    values: [\"http\"]\n")
                .contains("spec.rules[0].when[0].values[0]")
        );
        assert!(serde_yaml::from_str::<Spec>(
            "rules:\n- from:\n  - source:\n      ipBlocks: [\"1.2.3\"]\n"
        )
        .is_err());
    }
}
