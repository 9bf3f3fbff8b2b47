//! Policy file → **admission**: before a `PeerAuthentication` or `AuthorizationPolicy` is read
//! for its meaning, what istiod's validation (and the CRD schema the API server enforces)
//! would refuse, l4mesh refuses. In Istio such a resource never takes effect; read from a file
//! with no admission step in between, it must not get a meaning here either.
//!
//! Each [`Rule`] follows one check in istio/istio (`pkg/config/validation/validation.go`,
//! `pkg/config/security/security.go`, and the `x-kubernetes-validations` of
//! `manifests/charts/base/files/crd-all.gen.yaml`); [`Rule::istiod`] is istiod's own message,
//! so a refusal can be looked up there. The checks read the document as plain YAML, so that
//! "written but empty" (`from: []`) is told apart from "left out", as istiod tells them apart.

use std::fmt;

use serde_yaml::Value;

/// Declares [`Rule`] and [`Rule::ALL`] from one list, so no rule can be left out of `ALL`
/// (the table test requires a row for each).
macro_rules! rules {
    ($($rule:ident),* $(,)?) => {
        /// One of istiod's validation rules for the two kinds.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
        pub enum Rule {
            $($rule),*
        }

        impl Rule {
            /// Every rule, for tests and documentation that must cover them all.
            pub const ALL: &'static [Rule] = &[$(Rule::$rule),*];
        }
    };
}

rules! {
    SelectorEmptyKey,
    SelectorWildcard,
    SelectorValueTooLong,
    OneSelectorKind,
    TargetRefName,
    TargetRefNamespace,
    TargetRefKind,
    CustomWithoutRules,
    CustomWithoutProvider,
    CustomUnsupported,
    ProviderWithoutCustom,
    DenyWithoutRules,
    TooManyItems,
    NullRule,
    EmptyFrom,
    MissingSource,
    ServiceAccountsWithOthers,
    EmptySource,
    BadIp,
    EmptyValue,
    TooManyServiceAccounts,
    ServiceAccountFormat,
    WildcardPlacement,
    TrustDomainSlash,
    EmptyTo,
    MissingOperation,
    EmptyOperation,
    BadPort,
    PathTemplate,
    EmptyKey,
    NoValues,
    KeyFormat,
    ReplacedKey,
    DeprecatedKey,
    UnknownKey,
    PortLevelWithoutSelector,
    EmptyPortLevel,
    PortLevelPort,
}

impl Rule {
    /// istiod's message for the rule (searchable in istio/istio).
    pub fn istiod(self) -> &'static str {
        match self {
            Rule::SelectorEmptyKey => "empty key is not supported in selector",
            Rule::SelectorWildcard => "wildcard is not supported in selector",
            Rule::SelectorValueTooLong => "matchLabels value: maxLength 63",
            Rule::OneSelectorKind => "only one of targetRefs or workloadSelector can be set",
            Rule::TargetRefName => "targetRef name must be set",
            Rule::TargetRefNamespace => "targetRef namespace must not be set",
            Rule::TargetRefKind => {
                "targetRef must be to one of [Service ServiceEntry Gateway GatewayClass]"
            }
            Rule::CustomWithoutRules => "CUSTOM action without `rules` is meaningless",
            Rule::CustomWithoutProvider => "`provider.name` must not be empty",
            Rule::CustomUnsupported => "is currently not supported with CUSTOM action",
            Rule::ProviderWithoutCustom => "`provider` must not be with non CUSTOM action",
            Rule::DenyWithoutRules => "DENY action without `rules` is meaningless",
            Rule::TooManyItems => "maxItems: 512",
            Rule::NullRule => "`rule` must not be nil",
            Rule::EmptyFrom => "`from` must not be empty",
            Rule::MissingSource => "`from.source` must not be nil",
            Rule::ServiceAccountsWithOthers => {
                "cannot set serviceAccounts with namespaces or principals"
            }
            Rule::EmptySource => "`from.source` must not be empty",
            Rule::BadIp => "bad IP address / bad CIDR range",
            Rule::EmptyValue => "empty value not allowed",
            Rule::TooManyServiceAccounts => "may not have more than 16 values",
            Rule::ServiceAccountFormat => {
                "expected format 'serviceAccount' or 'namespace/serviceAccount'"
            }
            Rule::WildcardPlacement => "wildcard is only allowed at the start or end",
            Rule::TrustDomainSlash => "trust domain must not contain '/'",
            Rule::EmptyTo => "`to` must not be empty",
            Rule::MissingOperation => "`to.operation` must not be nil",
            Rule::EmptyOperation => "`to.operation` must not be empty",
            Rule::BadPort => "bad port",
            Rule::PathTemplate => "invalid or unsupported path",
            Rule::EmptyKey => "`key` must not be empty",
            Rule::NoValues => "at least one of `values` or `notValues` must be set",
            Rule::KeyFormat => "bad key: should have format a[b]",
            Rule::ReplacedKey => {
                "attribute is replaced by the metadata.namespace / workload selector"
            }
            Rule::DeprecatedKey => "deprecated attribute: only supported in v1alpha1",
            Rule::UnknownKey => "unknown attribute",
            Rule::PortLevelWithoutSelector => {
                "mesh/namespace peer authentication cannot have port level mTLS"
            }
            Rule::EmptyPortLevel => "port level mTLS, if defined, must have at least one element",
            Rule::PortLevelPort => "port must be in range 1..65535",
        }
    }

    /// Where in istio/istio the rule is.
    pub fn source(self) -> &'static str {
        match self {
            Rule::SelectorEmptyKey | Rule::SelectorWildcard => {
                "pkg/config/validation/validation.go validateWorkloadSelector"
            }
            Rule::SelectorValueTooLong | Rule::TooManyItems => {
                "manifests/charts/base/files/crd-all.gen.yaml (CRD schema)"
            }
            Rule::OneSelectorKind => {
                "pkg/config/validation/validation.go validateOneOfSelectorType"
            }
            Rule::TargetRefName | Rule::TargetRefNamespace | Rule::TargetRefKind => {
                "pkg/config/validation/validation.go validatePolicyTargetReference"
            }
            Rule::BadIp => "pkg/config/security/security.go ValidateIPs",
            Rule::BadPort => "pkg/config/security/security.go ValidatePorts",
            Rule::EmptyValue => "pkg/config/security/security.go CheckEmptyValues",
            Rule::TooManyServiceAccounts | Rule::ServiceAccountFormat => {
                "pkg/config/security/security.go CheckServiceAccount"
            }
            Rule::WildcardPlacement => "pkg/config/security/security.go CheckWildcardValues",
            Rule::TrustDomainSlash => "pkg/config/security/security.go CheckTrustDomainValues",
            Rule::PathTemplate => "pkg/config/security/security.go CheckValidPathTemplate",
            Rule::KeyFormat | Rule::ReplacedKey | Rule::DeprecatedKey | Rule::UnknownKey => {
                "pkg/config/security/security.go ValidateAttribute"
            }
            Rule::PortLevelWithoutSelector | Rule::EmptyPortLevel | Rule::PortLevelPort => {
                "pkg/config/validation/validation.go ValidatePeerAuthentication"
            }
            _ => "pkg/config/validation/validation.go ValidateAuthorizationPolicy",
        }
    }
}

/// Where a refusal is: a field path from the document's top (`spec.rules[0].from[0]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<Seg>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl FieldPath {
    fn key(&self, k: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }
    fn index(&self, i: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, s) in self.0.iter().enumerate() {
            match s {
                Seg::Index(i) => write!(f, "[{i}]")?,
                Seg::Key(k) if k.contains(['.', '[', ' ']) || k.is_empty() => write!(f, "[{k:?}]")?,
                Seg::Key(k) if n == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
            }
        }
        Ok(())
    }
}

/// One thing istiod would refuse, where, and why in l4mesh's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub at: FieldPath,
    pub rule: Rule,
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (istiod refuses it: \"{}\")",
            self.at,
            self.message,
            self.rule.istiod()
        )
    }
}

struct Check {
    out: Vec<Refusal>,
}

impl Check {
    fn refuse(&mut self, at: FieldPath, rule: Rule, message: impl Into<String>) {
        self.out.push(Refusal {
            at,
            rule,
            message: message.into(),
        });
    }
}

/// What istiod would refuse in an AuthorizationPolicy document (`doc` is the whole document).
pub fn authorization_policy(doc: &Value) -> Vec<Refusal> {
    let mut c = Check { out: Vec::new() };
    let at = FieldPath::default().key("spec");
    let Some(spec) = doc.get("spec").filter(|s| s.is_mapping()) else {
        return c.out;
    };
    let selector = present(spec, "selector");
    let target_ref = present(spec, "targetRef");
    let target_refs = items(spec.get("targetRefs"));
    if [
        selector.is_some(),
        target_ref.is_some(),
        !target_refs.is_empty(),
    ]
    .iter()
    .filter(|s| **s)
    .count()
        > 1
    {
        let field = if target_ref.is_some() {
            "targetRef"
        } else {
            "targetRefs"
        };
        c.refuse(
            at.key(field),
            Rule::OneSelectorKind,
            "a policy is bound by `selector` or by `targetRef(s)`, not both",
        );
    }
    if let Some(s) = selector {
        workload_selector(&mut c, &at.key("selector"), s);
    }
    if let Some(t) = target_ref {
        policy_target(&mut c, &at.key("targetRef"), t);
    }
    for (i, t) in target_refs.iter().enumerate() {
        policy_target(&mut c, &at.key("targetRefs").index(i), t);
    }

    let action = spec
        .get("action")
        .and_then(Value::as_str)
        .unwrap_or("ALLOW");
    let rules = items(spec.get("rules"));
    let provider = present(spec, "provider");
    if action == "CUSTOM" {
        if rules.is_empty() {
            c.refuse(
                at.key("action"),
                Rule::CustomWithoutRules,
                "a CUSTOM policy without rules never applies (write `rules: [{}]` to apply it to every connection)",
            );
        } else if provider
            .and_then(|p| p.get("name"))
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            c.refuse(
                at.key("provider"),
                Rule::CustomWithoutProvider,
                "a CUSTOM policy must name its extension provider (`provider.name`)",
            );
        }
        custom_rules(&mut c, &at, &rules);
    } else if provider.is_some() {
        c.refuse(
            at.key("provider"),
            Rule::ProviderWithoutCustom,
            format!("`provider` belongs to CUSTOM policies only, and this one is {action}"),
        );
    }
    if action == "DENY" && rules.is_empty() {
        c.refuse(
            at.key("action"),
            Rule::DenyWithoutRules,
            "a DENY policy without rules never applies (write `rules: [{}]` to deny every connection)",
        );
    }
    if rules.len() > 512 {
        c.refuse(
            at.key("rules"),
            Rule::TooManyItems,
            format!("{} rules, more than 512", rules.len()),
        );
    }
    for (i, rule) in rules.iter().enumerate() {
        let at = at.key("rules").index(i);
        if rule.is_null() {
            c.refuse(at, Rule::NullRule, "an empty rule item (`- `)");
            continue;
        }
        authz_rule(&mut c, &at, rule);
    }
    c.out
}

fn authz_rule(c: &mut Check, at: &FieldPath, rule: &Value) {
    if let Some(from) = rule.get("from").filter(|f| !f.is_null()) {
        let from = items(Some(from));
        if from.is_empty() {
            c.refuse(
                at.key("from"),
                Rule::EmptyFrom,
                "`from: []` names no source (leave `from` out to match any)",
            );
        }
        if from.len() > 512 {
            c.refuse(
                at.key("from"),
                Rule::TooManyItems,
                format!("{} sources, more than 512", from.len()),
            );
        }
        for (j, f) in from.iter().enumerate() {
            let at = at.key("from").index(j);
            match present(f, "source") {
                None => c.refuse(at, Rule::MissingSource, "a `from` item without `source`"),
                Some(s) => source(c, &at.key("source"), s),
            }
        }
    }
    if let Some(to) = rule.get("to").filter(|t| !t.is_null()) {
        let to = items(Some(to));
        if to.is_empty() {
            c.refuse(
                at.key("to"),
                Rule::EmptyTo,
                "`to: []` names no operation (leave `to` out to match any)",
            );
        }
        for (j, t) in to.iter().enumerate() {
            let at = at.key("to").index(j);
            match present(t, "operation") {
                None => c.refuse(
                    at,
                    Rule::MissingOperation,
                    "a `to` item without `operation`",
                ),
                Some(op) => operation(c, &at.key("operation"), op),
            }
        }
    }
    for (k, cond) in items(rule.get("when")).iter().enumerate() {
        condition(c, &at.key("when").index(k), cond);
    }
}

const SOURCE_FIELDS: [&str; 14] = [
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "trustDomains",
    "notTrustDomains",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];

fn source(c: &mut Check, at: &FieldPath, s: &Value) {
    let has = |f: &str| present(s, f).is_some();
    if (has("serviceAccounts") || has("notServiceAccounts"))
        && ["principals", "notPrincipals", "namespaces", "notNamespaces"]
            .iter()
            .any(|f| has(f))
    {
        c.refuse(
            at.clone(),
            Rule::ServiceAccountsWithOthers,
            "`serviceAccounts` cannot be combined with `principals` or `namespaces` in one source",
        );
    }
    if SOURCE_FIELDS.iter().all(|f| items(s.get(f)).is_empty()) {
        c.refuse(
            at.clone(),
            Rule::EmptySource,
            "names no peer: no field is set (leave `from` out to match any source)",
        );
    }
    for field in SOURCE_FIELDS {
        let list = scalars(s.get(field));
        let at = at.key(field);
        match field {
            "serviceAccounts" | "notServiceAccounts" => service_accounts(c, &at, &list),
            "trustDomains" | "notTrustDomains" => trust_domains(c, &at, &list, true),
            _ => {
                empty_values(c, &at, &list);
                if field.ends_with("pBlocks") {
                    ips(c, &at, &list);
                }
            }
        }
    }
}

const OPERATION_FIELDS: [&str; 8] = [
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
    "hosts",
    "notHosts",
];

fn operation(c: &mut Check, at: &FieldPath, op: &Value) {
    if OPERATION_FIELDS.iter().all(|f| items(op.get(f)).is_empty()) {
        c.refuse(
            at.clone(),
            Rule::EmptyOperation,
            "names no operation: no field is set (leave `to` out to match any)",
        );
    }
    for field in OPERATION_FIELDS {
        let list = scalars(op.get(field));
        let at = at.key(field);
        empty_values(c, &at, &list);
        match field {
            "ports" | "notPorts" => ports(c, &at, &list),
            "paths" | "notPaths" => paths(c, &at, &list),
            _ => {}
        }
    }
}

fn condition(c: &mut Check, at: &FieldPath, cond: &Value) {
    let key = cond.get("key").and_then(Value::as_str).unwrap_or_default();
    if key.is_empty() {
        c.refuse(at.key("key"), Rule::EmptyKey, "a condition without a `key`");
        return;
    }
    let values = scalars(cond.get("values"));
    let not_values = scalars(cond.get("notValues"));
    if values.is_empty() && not_values.is_empty() {
        c.refuse(
            at.clone(),
            Rule::NoValues,
            format!("condition on {key} has neither `values` nor `notValues`"),
        );
        return;
    }
    let map_key = |c: &mut Check| {
        let open = key.find('[');
        if !(key.ends_with(']') && open.is_some_and(|o| o > 0 && o + 2 < key.len())) {
            c.refuse(
                at.key("key"),
                Rule::KeyFormat,
                format!(
                    "{key:?} must name its entry in brackets, as `{}[name]`",
                    key.split('[').next().unwrap_or(key)
                ),
            );
        }
    };
    let wrong_key = |c: &mut Check, rule: Rule, why: &str| {
        c.refuse(at.key("key"), rule, format!("{key:?}: {why}"));
    };
    match key {
        k if k.starts_with("request.headers") => map_key(c),
        k if k.starts_with("request.auth.claims") => map_key(c),
        k if k.starts_with("experimental.envoy.filters.") => map_key(c),
        "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni"
        | "source.ip"
        | "remote.ip"
        | "destination.ip"
        | "source.serviceAccount"
        | "source.trustDomain"
        | "destination.port" => {}
        "destination.namespace" => wrong_key(
            c,
            Rule::ReplacedKey,
            "replaced by the policy's own metadata.namespace",
        ),
        k if k.starts_with("destination.labels") => {
            wrong_key(c, Rule::ReplacedKey, "replaced by the workload selector")
        }
        "destination.name" | "destination.user" => wrong_key(
            c,
            Rule::DeprecatedKey,
            "only supported by the retired v1alpha1 RBAC API",
        ),
        _ => wrong_key(c, Rule::UnknownKey, "not a condition key Istio knows"),
    }
    for (field, list) in [("values", &values), ("notValues", &not_values)] {
        let at = at.key(field);
        match key {
            "source.ip" | "remote.ip" | "destination.ip" => {
                empty_values(c, &at, list);
                ips(c, &at, list)
            }
            "destination.port" => {
                empty_values(c, &at, list);
                ports(c, &at, list)
            }
            "source.serviceAccount" => service_accounts(c, &at, list),
            "source.trustDomain" => trust_domains(c, &at, list, false),
            _ => empty_values(c, &at, list),
        }
    }
}

/// CUSTOM policies: the fields and keys istiod does not support with them.
fn custom_rules(c: &mut Check, at: &FieldPath, rules: &[&Value]) {
    for (i, rule) in rules.iter().enumerate() {
        let at = at.key("rules").index(i);
        for (j, f) in items(rule.get("from")).iter().enumerate() {
            let Some(s) = present(f, "source") else {
                continue;
            };
            for field in SOURCE_FIELDS {
                if field.contains("pBlocks") || items(s.get(field)).is_empty() {
                    continue;
                }
                c.refuse(
                    at.key("from").index(j).key("source").key(field),
                    Rule::CustomUnsupported,
                    format!("`{field}` cannot be used in a CUSTOM policy"),
                );
            }
        }
        for (k, cond) in items(rule.get("when")).iter().enumerate() {
            let key = cond.get("key").and_then(Value::as_str).unwrap_or_default();
            if matches!(
                key,
                "source.namespace"
                    | "source.serviceAccount"
                    | "source.trustDomain"
                    | "source.principal"
            ) || key.starts_with("request.auth.")
            {
                c.refuse(
                    at.key("when").index(k).key("key"),
                    Rule::CustomUnsupported,
                    format!("condition key {key} cannot be used in a CUSTOM policy"),
                );
            }
        }
    }
}

/// What istiod would refuse in a document of either kind (nothing for other kinds).
pub fn document(doc: &Value) -> Vec<Refusal> {
    match doc.get("kind").and_then(Value::as_str) {
        Some("AuthorizationPolicy") => authorization_policy(doc),
        Some("PeerAuthentication") => peer_authentication(doc),
        _ => Vec::new(),
    }
}

/// Refusals as one message, each with its line and column when they can be found.
pub fn message(
    refusals: &[Refusal],
    locate: impl Fn(&FieldPath) -> Option<(usize, usize)>,
) -> String {
    refusals
        .iter()
        .map(|r| match locate(&r.at) {
            Some((line, column)) => format!("line {line} column {column}: {r}"),
            None => r.to_string(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What istiod would refuse in a PeerAuthentication document.
pub fn peer_authentication(doc: &Value) -> Vec<Refusal> {
    let mut c = Check { out: Vec::new() };
    let at = FieldPath::default().key("spec");
    let Some(spec) = doc.get("spec").filter(|s| s.is_mapping()) else {
        return c.out;
    };
    let selector = present(spec, "selector");
    if let Some(s) = selector {
        workload_selector(&mut c, &at.key("selector"), s);
    }
    let no_labels = selector
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_mapping)
        .is_none_or(|m| m.is_empty());
    if let Some(plm) = present(spec, "portLevelMtls") {
        let at = at.key("portLevelMtls");
        if no_labels {
            c.refuse(
                at.clone(),
                Rule::PortLevelWithoutSelector,
                "portLevelMtls applies only to workloads chosen by a selector with labels, and a namespace- or mesh-wide PeerAuthentication cannot have it",
            );
        }
        if let Some(ports) = plm.as_mapping() {
            if ports.is_empty() {
                c.refuse(
                    at.clone(),
                    Rule::EmptyPortLevel,
                    "`portLevelMtls: {}` lists no port (leave it out)",
                );
            }
            for (k, _) in ports {
                let text = scalar(k).unwrap_or_default();
                let ok = text
                    .trim()
                    .parse::<i64>()
                    .is_ok_and(|p| (1..=65535).contains(&p));
                if !ok {
                    c.refuse(
                        at.key(&text),
                        Rule::PortLevelPort,
                        format!("port {text:?} is not a number from 1 to 65535"),
                    );
                }
            }
        }
    }
    c.out
}

fn workload_selector(c: &mut Check, at: &FieldPath, selector: &Value) {
    let Some(labels) = selector.get("matchLabels").and_then(Value::as_mapping) else {
        return;
    };
    let at = at.key("matchLabels");
    for (k, v) in labels {
        let key = scalar(k).unwrap_or_default();
        let value = scalar(v).unwrap_or_default();
        if key.is_empty() {
            c.refuse(
                at.key(&key),
                Rule::SelectorEmptyKey,
                "a label with an empty key",
            );
        }
        if key.contains('*') || value.contains('*') {
            c.refuse(
                at.key(&key),
                Rule::SelectorWildcard,
                format!("{key}={value}: labels match exactly, with no wildcard"),
            );
        }
        if value.len() > 63 {
            c.refuse(
                at.key(&key),
                Rule::SelectorValueTooLong,
                format!(
                    "the value of {key} is {} characters, more than a label value may have (63)",
                    value.len()
                ),
            );
        }
    }
}

fn policy_target(c: &mut Check, at: &FieldPath, t: &Value) {
    let text = |f: &str| t.get(f).and_then(scalar).unwrap_or_default();
    if text("name").is_empty() {
        c.refuse(
            at.key("name"),
            Rule::TargetRefName,
            "a target without a name",
        );
    }
    if !text("namespace").is_empty() {
        c.refuse(
            at.key("namespace"),
            Rule::TargetRefNamespace,
            "a target in another namespace (cross-namespace references are not supported)",
        );
    }
    let (group, kind) = (text("group"), text("kind"));
    let group = if group.is_empty() { "core" } else { &group };
    let allowed = matches!(
        (group, kind.as_str()),
        ("core", "Service")
            | ("networking.istio.io", "ServiceEntry")
            | ("gateway.networking.k8s.io", "Gateway" | "GatewayClass")
    );
    if !allowed {
        c.refuse(
            at.key("kind"),
            Rule::TargetRefKind,
            format!("{group}/{kind} cannot be a policy's target (Service, ServiceEntry, Gateway, GatewayClass)"),
        );
    }
}

fn empty_values(c: &mut Check, at: &FieldPath, list: &[(usize, String)]) {
    for (i, v) in list {
        if v.is_empty() {
            c.refuse(
                at.index(*i),
                Rule::EmptyValue,
                "an empty string matches nothing",
            );
        }
    }
}

fn ips(c: &mut Check, at: &FieldPath, list: &[(usize, String)]) {
    for (i, v) in list {
        if !v.is_empty() && v.parse::<super::authz::IpBlock>().is_err() {
            c.refuse(
                at.index(*i),
                Rule::BadIp,
                format!("{v:?} is not an IP address or CIDR"),
            );
        }
    }
}

/// Single ports only, as Go's `strconv.ParseUint(port, 10, 32)` ≤ 65535 reads them: a range
/// (`8000-9000`) is refused.
fn ports(c: &mut Check, at: &FieldPath, list: &[(usize, String)]) {
    for (i, v) in list {
        let ok = !v.is_empty()
            && v.bytes().all(|b| b.is_ascii_digit())
            && v.parse::<u64>().is_ok_and(|p| p <= 65535);
        if !v.is_empty() && !ok {
            c.refuse(
                at.index(*i),
                Rule::BadPort,
                format!(
                    "{v:?} is not a port number from 0 to 65535 (Istio has no port ranges here)"
                ),
            );
        }
    }
}

fn service_accounts(c: &mut Check, at: &FieldPath, list: &[(usize, String)]) {
    if list.len() > 16 {
        c.refuse(
            at.clone(),
            Rule::TooManyServiceAccounts,
            format!("{} service accounts, more than 16", list.len()),
        );
    }
    empty_values(c, at, list);
    for (i, v) in list {
        let why = if v.is_empty() {
            continue;
        } else if v.contains('*') {
            "no wildcard is allowed in a service account"
        } else if v.matches('/').count() > 1 {
            "more than one `/`"
        } else if v.len() > 320 {
            "longer than 320 characters"
        } else if v.starts_with('/') {
            "the namespace before `/` is empty"
        } else if v.ends_with('/') {
            "the service account after `/` is empty"
        } else {
            continue;
        };
        c.refuse(
            at.index(*i),
            Rule::ServiceAccountFormat,
            format!("{v:?} is not `<namespace>/<service account>` or `<service account>`: {why}"),
        );
    }
}

fn trust_domains(c: &mut Check, at: &FieldPath, list: &[(usize, String)], no_slash: bool) {
    empty_values(c, at, list);
    for (i, v) in list {
        let stars = v.matches('*').count();
        if stars > 1 || (stars == 1 && v != "*" && !v.starts_with('*') && !v.ends_with('*')) {
            c.refuse(
                at.index(*i),
                Rule::WildcardPlacement,
                format!("{v:?}: one `*`, at the start or the end, is all a value may have"),
            );
        } else if no_slash && v.contains('/') {
            c.refuse(
                at.index(*i),
                Rule::TrustDomainSlash,
                format!(
                    "{v:?} is not a trust domain: it has a `/` (a principal goes in `principals`)"
                ),
            );
        }
    }
}

fn paths(c: &mut Check, at: &FieldPath, list: &[(usize, String)]) {
    for (i, v) in list {
        if let Err(why) = path_template(v) {
            c.refuse(at.index(*i), Rule::PathTemplate, format!("{v:?}: {why}"));
        }
    }
}

/// Envoy's URI templates as istiod accepts them: `{*}` one segment, `{**}` the rest (last),
/// and no other braces; with a template, every other segment a plain literal.
fn path_template(path: &str) -> Result<(), &'static str> {
    let template = path.contains("{*}") || path.contains("{**}");
    let mut any = false;
    for glob in path.trim_matches('/').split('/') {
        match glob {
            "{*}" | "{**}" if any => return Err("`{**}` must be the last operator"),
            "{*}" => continue,
            "{**}" => {
                any = true;
                continue;
            }
            _ => {}
        }
        if glob.contains(['{', '}']) {
            return Err("`{` or `}` outside a `{*}` or `{**}` template");
        }
        let literal = !glob.is_empty()
            && glob
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@=".contains(ch));
        if template && !literal {
            return Err("a segment beside a template is not a plain literal");
        }
    }
    Ok(())
}

/// A field that is written and not null (CEL's `has()`, protobuf's "set").
fn present<'a>(v: &'a Value, field: &str) -> Option<&'a Value> {
    v.get(field).filter(|f| !f.is_null())
}

/// The items of a list field (nothing when absent, null or not a list: the typed reading
/// reports a wrong shape).
fn items(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Sequence(s)) => s.iter().collect(),
        _ => Vec::new(),
    }
}

/// The scalar items of a list field, with their indexes.
fn scalars(v: Option<&Value>) -> Vec<(usize, String)> {
    items(v)
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| Some((i, scalar(v)?)))
        .collect()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Line and column of `path` in document `index` (from 1) of `text`, or in its List item
/// `item` (from 1): the field's key, or the list element. Found by reading the document again
/// with serde_yaml, which marks an error with the position of the node it was raised at.
pub fn locate(
    text: &str,
    index: usize,
    item: Option<usize>,
    path: &FieldPath,
) -> Option<(usize, usize)> {
    use serde::de::DeserializeSeed;
    let mut full = FieldPath::default();
    if let Some(j) = item {
        full = full.key("items").index(j - 1);
    }
    full.0.extend(path.0.iter().cloned());
    let doc = serde_yaml::Deserializer::from_str(text).nth(index - 1)?;
    let e = probe::At(&full.0).deserialize(doc).err()?;
    e.location().map(|l| (l.line(), l.column()))
}

mod probe {
    use super::Seg;
    use serde::de::{
        DeserializeSeed, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };
    use std::fmt;

    /// Walks to the node at a path and fails there (the failure carries the position).
    pub struct At<'a>(pub &'a [Seg]);
    struct Here;
    struct KeyIs<'a>(&'a str, bool);

    impl<'de> DeserializeSeed<'de> for At<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            match self.0.first() {
                None => d.deserialize_any(Here),
                Some(Seg::Key(_)) => d.deserialize_map(self),
                Some(Seg::Index(_)) => d.deserialize_seq(self),
            }
        }
    }

    impl<'de> Visitor<'de> for At<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("the path")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let (Some(Seg::Key(k)), rest) = (self.0.first(), &self.0[1..]) else {
                return Ok(());
            };
            while let Some(hit) = map.next_key_seed(KeyIs(k, rest.is_empty()))? {
                if hit {
                    return map.next_value_seed(At(rest));
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let (Some(Seg::Index(n)), rest) = (self.0.first(), &self.0[1..]) else {
                return Ok(());
            };
            for _ in 0..*n {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(());
                }
            }
            seq.next_element_seed(At(rest))?;
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(())
        }
    }

    impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
        type Value = bool;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for KeyIs<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<bool, E> {
            match (v == self.0, self.1) {
                (true, true) => Err(E::custom("here")),
                (hit, _) => Ok(hit),
            }
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<bool, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<bool, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_bool<E: Error>(self, v: bool) -> Result<bool, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_unit<E: Error>(self) -> Result<bool, E> {
            self.visit_str("")
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<bool, E> {
            self.visit_str(&v.to_string())
        }
    }

    impl<'de> Visitor<'de> for Here {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("here")
        }
        // Every visit method keeps its default: an error, marked where this node is.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySet;
    use std::path::Path;

    /// One row: a spec istiod refuses under `rule`, the field and the line (counted from the
    /// spec's first line) the refusal must name, and a spec beside it that istiod accepts.
    struct Case {
        rule: Rule,
        /// The check in istio/istio this row follows (besides [`Rule::source`]).
        cite: &'static str,
        kind: &'static str,
        refused: String,
        at: &'static str,
        line: usize,
        accepted: String,
    }

    fn case(
        rule: Rule,
        cite: &'static str,
        refused: &str,
        at: &'static str,
        line: usize,
        accepted: &str,
    ) -> Case {
        Case {
            rule,
            cite,
            kind: "AuthorizationPolicy",
            refused: refused.to_string(),
            at,
            line,
            accepted: accepted.to_string(),
        }
    }

    fn peer(mut c: Case) -> Case {
        c.kind = "PeerAuthentication";
        c
    }

    /// The document around a spec: the spec's first line is line 7.
    fn document(kind: &str, spec: &str) -> String {
        let body: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        format!(
            "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: t\n  namespace: shop\nspec:\n{body}"
        )
    }

    fn table() -> Vec<Case> {
        let src = |f: &str| format!("rules:\n- from:\n  - source:\n      {f}\n");
        let op = |f: &str| format!("rules:\n- to:\n  - operation:\n      {f}\n");
        let when = |k: &str| format!("rules:\n- when:\n  - key: {k}\n    values: [\"x[y]\"]\n");
        let many = |n: usize| format!("rules:\n{}", "- {}\n".repeat(n));
        let accounts = |n: usize| {
            let list: Vec<String> = (0..n).map(|i| format!("sa{i}")).collect();
            src(&format!("serviceAccounts: [{}]", list.join(", ")))
        };
        let custom = "action: CUSTOM\nprovider:\n  name: opa\n";
        vec![
            case(Rule::SelectorEmptyKey, "validateWorkloadSelector: empty key",
                "selector:\n  matchLabels:\n    \"\": cart\n", "spec.selector.matchLabels[\"\"]", 3,
                "selector:\n  matchLabels:\n    app: cart\n"),
            case(Rule::SelectorWildcard, "validateWorkloadSelector: wildcard",
                "selector:\n  matchLabels:\n    app: \"cart*\"\n", "spec.selector.matchLabels.app", 3,
                "selector:\n  matchLabels:\n    app: cart\n"),
            case(Rule::SelectorValueTooLong, "CRD: matchLabels additionalProperties maxLength 63",
                &format!("selector:\n  matchLabels:\n    app: {}\n", "a".repeat(64)), "spec.selector.matchLabels.app", 3,
                &format!("selector:\n  matchLabels:\n    app: {}\n", "a".repeat(63))),
            case(Rule::OneSelectorKind, "validateOneOfSelectorType",
                "selector:\n  matchLabels:\n    app: cart\ntargetRef:\n  kind: Service\n  name: cart\n", "spec.targetRef", 4,
                "targetRef:\n  kind: Service\n  name: cart\n"),
            case(Rule::TargetRefName, "validatePolicyTargetReference: name",
                "targetRef:\n  kind: Service\n  name: \"\"\n", "spec.targetRef.name", 3,
                "targetRef:\n  kind: Service\n  name: cart\n"),
            case(Rule::TargetRefNamespace, "validatePolicyTargetReference: namespace",
                "targetRefs:\n- kind: Service\n  name: cart\n  namespace: web\n", "spec.targetRefs[0].namespace", 4,
                "targetRefs:\n- kind: Service\n  name: cart\n"),
            case(Rule::TargetRefKind, "validatePolicyTargetReference: allowedTargetRefs",
                "targetRef:\n  kind: Deployment\n  name: cart\n", "spec.targetRef.kind", 2,
                "targetRef:\n  group: gateway.networking.k8s.io\n  kind: Gateway\n  name: cart\n"),
            case(Rule::CustomWithoutRules, "ValidateAuthorizationPolicy: CUSTOM, in.Rules == nil",
                custom, "spec.action", 1, &format!("{custom}rules:\n- {{}}\n")),
            case(Rule::CustomWithoutProvider, "ValidateAuthorizationPolicy: provider.name",
                "action: CUSTOM\nprovider:\n  name: \"\"\nrules:\n- {}\n", "spec.provider", 2,
                &format!("{custom}rules:\n- {{}}\n")),
            case(Rule::CustomUnsupported, "ValidateAuthorizationPolicy: check(len(src.Principals) != 0, ...)",
                &format!("{custom}{}", src("principals: [\"cluster.local/ns/web/sa/x\"]")),
                "spec.rules[0].from[0].source.principals", 7,
                &format!("{custom}{}", src("ipBlocks: [\"10.0.0.0/8\"]"))),
            case(Rule::ProviderWithoutCustom, "ValidateAuthorizationPolicy: provider with non CUSTOM action",
                "action: DENY\nprovider:\n  name: opa\nrules:\n- {}\n", "spec.provider", 2,
                "action: DENY\nrules:\n- {}\n"),
            case(Rule::DenyWithoutRules, "ValidateAuthorizationPolicy: DENY, in.Rules == nil",
                "action: DENY\n", "spec.action", 1, "action: DENY\nrules:\n- {}\n"),
            case(Rule::TooManyItems, "CRD: rules maxItems 512",
                &many(513), "spec.rules", 1, &many(512)),
            case(Rule::NullRule, "ValidateAuthorizationPolicy: rule == nil",
                "rules:\n- {}\n-\n", "spec.rules[1]", 3, "rules:\n- {}\n"),
            case(Rule::EmptyFrom, "ValidateAuthorizationPolicy: rule.From != nil && len(rule.From) == 0",
                "rules:\n- from: []\n", "spec.rules[0].from", 2, &src("namespaces: [web]")),
            case(Rule::MissingSource, "ValidateAuthorizationPolicy: from.Source == nil",
                "rules:\n- from:\n  - {}\n", "spec.rules[0].from[0]", 3, &src("namespaces: [web]")),
            case(Rule::ServiceAccountsWithOthers, "CRD x-kubernetes-validations, ValidateAuthorizationPolicy",
                "rules:\n- from:\n  - source:\n      serviceAccounts: [web/x]\n      namespaces: [web]\n",
                "spec.rules[0].from[0].source", 3, &src("serviceAccounts: [web/x]")),
            case(Rule::EmptySource, "ValidateAuthorizationPolicy: `from.source` must not be empty",
                "rules:\n- from:\n  - source: {}\n", "spec.rules[0].from[0].source", 3, &src("namespaces: [web]")),
            case(Rule::BadIp, "ValidateIPs", &src("ipBlocks: [\"10.0.0.300\"]"),
                "spec.rules[0].from[0].source.ipBlocks[0]", 4, &src("ipBlocks: [\"10.0.0.0/8\"]")),
            case(Rule::EmptyValue, "CheckEmptyValues", &src("principals: [\"\"]"),
                "spec.rules[0].from[0].source.principals[0]", 4, &src("principals: [\"*\"]")),
            case(Rule::TooManyServiceAccounts, "CheckServiceAccount: len(values) > 16",
                &accounts(17), "spec.rules[0].from[0].source.serviceAccounts", 4, &accounts(16)),
            case(Rule::ServiceAccountFormat, "CheckServiceAccount: segments", &src("serviceAccounts: [\"a/b/c\"]"),
                "spec.rules[0].from[0].source.serviceAccounts[0]", 4, &src("serviceAccounts: [\"a/b\"]")),
            case(Rule::WildcardPlacement, "CheckWildcardValues", &src("trustDomains: [\"a*b\"]"),
                "spec.rules[0].from[0].source.trustDomains[0]", 4, &src("trustDomains: [\"*.local\"]")),
            case(Rule::TrustDomainSlash, "CheckTrustDomainValues", &src("trustDomains: [\"td/ns/web\"]"),
                "spec.rules[0].from[0].source.trustDomains[0]", 4, &src("trustDomains: [\"td\"]")),
            case(Rule::EmptyTo, "ValidateAuthorizationPolicy: rule.To != nil && len(rule.To) == 0",
                "rules:\n- to: []\n", "spec.rules[0].to", 2, &op("ports: [\"80\"]")),
            case(Rule::MissingOperation, "ValidateAuthorizationPolicy: to.Operation == nil",
                "rules:\n- to:\n  - {}\n", "spec.rules[0].to[0]", 3, &op("ports: [\"80\"]")),
            case(Rule::EmptyOperation, "ValidateAuthorizationPolicy: `to.operation` must not be empty",
                "rules:\n- to:\n  - operation: {}\n", "spec.rules[0].to[0].operation", 3, &op("ports: [\"80\"]")),
            case(Rule::BadPort, "ValidatePorts: strconv.ParseUint", &op("ports: [\"8000-9000\"]"),
                "spec.rules[0].to[0].operation.ports[0]", 4, &op("ports: [\"8000\", \"9000\"]")),
            case(Rule::PathTemplate, "CheckValidPathTemplate", &op("paths: [\"/api/{**}/{*}\"]"),
                "spec.rules[0].to[0].operation.paths[0]", 4, &op("paths: [\"/api/{*}/{**}\"]")),
            case(Rule::EmptyKey, "ValidateAuthorizationPolicy: `key` must not be empty",
                "rules:\n- when:\n  - key: \"\"\n    values: [a]\n", "spec.rules[0].when[0].key", 3, &when("source.namespace")),
            case(Rule::NoValues, "ValidateAuthorizationPolicy: values or notValues",
                "rules:\n- when:\n  - key: source.namespace\n", "spec.rules[0].when[0]", 3, &when("source.namespace")),
            case(Rule::KeyFormat, "ValidateAttribute: validateMapKey", &when("request.headers"),
                "spec.rules[0].when[0].key", 3, &when("request.headers[x-user]")),
            case(Rule::ReplacedKey, "ValidateAttribute: attrDestNamespace", &when("destination.namespace"),
                "spec.rules[0].when[0].key", 3, &when("source.namespace")),
            case(Rule::DeprecatedKey, "ValidateAttribute: attrDestUser", &when("destination.user"),
                "spec.rules[0].when[0].key", 3, &when("source.principal")),
            case(Rule::UnknownKey, "ValidateAttribute: unknown attribute", &when("connection.snl"),
                "spec.rules[0].when[0].key", 3, &when("connection.sni")),
            peer(case(Rule::PortLevelWithoutSelector, "ValidatePeerAuthentication: emptySelector && len(PortLevelMtls) != 0",
                "portLevelMtls:\n  \"8080\":\n    mode: STRICT\n", "spec.portLevelMtls", 1,
                "selector:\n  matchLabels:\n    app: cart\nportLevelMtls:\n  \"8080\":\n    mode: STRICT\n")),
            peer(case(Rule::EmptyPortLevel, "ValidatePeerAuthentication: PortLevelMtls != nil && len == 0",
                "selector:\n  matchLabels:\n    app: cart\nportLevelMtls: {}\n", "spec.portLevelMtls", 4,
                "selector:\n  matchLabels:\n    app: cart\n")),
            peer(case(Rule::PortLevelPort, "ValidatePeerAuthentication: port <= 0 || port > 65535",
                "selector:\n  matchLabels:\n    app: cart\nportLevelMtls:\n  0:\n    mode: STRICT\n", "spec.portLevelMtls.0", 5,
                "selector:\n  matchLabels:\n    app: cart\nportLevelMtls:\n  1:\n    mode: STRICT\n")),
        ]
    }

    #[test]
    fn each_of_istiods_rules_is_refused_with_its_field_and_line() {
        let table = table();
        for &rule in Rule::ALL {
            assert!(table.iter().any(|c| c.rule == rule), "{rule:?} has no row");
        }
        for c in &table {
            assert!(!c.cite.is_empty() && !c.rule.source().is_empty());
            let text = document(c.kind, &c.refused);
            let set = PolicySet::parse(Path::new("p.yaml"), &text).unwrap();
            assert_eq!(set.broken.len(), 1, "{:?} not refused:\n{text}", c.rule);
            let m = &set.broken[0].message;
            let ours = m
                .split("; ")
                .find(|r| r.contains(c.rule.istiod()))
                .unwrap_or_else(|| panic!("{:?}: rule not named in {m}", c.rule));
            let line = format!("line {} column ", 6 + c.line);
            assert!(
                ours.starts_with(&line) && ours.contains(&format!(": {}: ", c.at)),
                "{:?}: wanted {line:?} and {:?} in {ours:?}",
                c.rule,
                c.at
            );
            println!("{ours}");
            let text = document(c.kind, &c.accepted);
            let set = PolicySet::parse(Path::new("p.yaml"), &text).unwrap();
            assert!(
                set.broken.is_empty(),
                "{:?}: accepted case refused: {:?}",
                c.rule,
                set.broken
            );
        }
    }

    #[test]
    fn a_list_item_is_located_in_the_list() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    name: t\n    namespace: shop\n  spec:\n    rules:\n    - from:\n      - source: {}\n";
        let set = PolicySet::parse(Path::new("p.yaml"), text).unwrap();
        assert!(
            set.broken[0]
                .message
                .starts_with("line 12 column 9: spec.rules[0].from[0].source: "),
            "{}",
            set.broken[0].message
        );
    }

    #[test]
    fn path_templates_as_istiod_reads_them() {
        for ok in ["/a/b", "/a/{*}/b", "/a/{**}", "/{*}/{*}/{**}", "/a*", "*"] {
            assert!(path_template(ok).is_ok(), "{ok}");
        }
        for bad in ["/a/{**}/{*}", "/a/{x}", "/a/{*}/b c", "/a/{*}//b"] {
            assert!(path_template(bad).is_err(), "{bad}");
        }
    }
}
