//! Policy: which mTLS mode each inbound port of this workload is in, from Istio
//! `PeerAuthentication` resources. Pure functions from the policy file's text and the
//! workload's namespace and labels to an [`EffectiveMtls`] table that `inbound` consults per
//! connection; `watch` re-runs them when the file changes.
//!
//! Istio's semantics: mesh-wide (root namespace, no selector) → namespace (no selector) →
//! workload (selector) → `portLevelMtls`; `UNSET` inherits from the level above; several
//! resources at one level: the oldest `creationTimestamp` wins (equal ones: by name, then
//! namespace; file order when absent);
//! nothing at all means PERMISSIVE.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::SystemTime;

use serde::Deserialize;
use thiserror::Error;

pub mod authz;
pub mod validate;

use authz::{AuthorizationPolicy, Authorizer};

/// An mTLS mode as written in a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ModeSetting {
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// The mode a port is in, once inheritance is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Mesh mTLS only; anything else is refused.
    Strict,
    /// Mesh mTLS is terminated; plaintext and foreign TLS are forwarded as they are.
    Permissive,
    /// No detection and no termination: bytes are forwarded as they are.
    Disable,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Strict => "STRICT",
            Mode::Permissive => "PERMISSIVE",
            Mode::Disable => "DISABLE",
        })
    }
}

/// Where a port's mode came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub level: Level,
    /// `namespace/name` of the deciding resource; `None` for the built-in default.
    pub resource: Option<String>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.resource {
            Some(r) => write!(f, "PeerAuthentication {r}, {}", self.level),
            None => write!(f, "{}", self.level),
        }
    }
}

/// The level of the hierarchy a mode was set at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Default,
    Mesh,
    Namespace,
    Workload,
    Port(u16),
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Default => f.write_str("no policy applies: PERMISSIVE by default"),
            Level::Mesh => f.write_str("mesh-wide"),
            Level::Namespace => f.write_str("namespace"),
            Level::Workload => f.write_str("workload selector"),
            Level::Port(p) => write!(f, "workload portLevelMtls {p}"),
        }
    }
}

/// One `PeerAuthentication` resource, as parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub created: Option<SystemTime>,
    /// `matchLabels`; `None` (or empty) = no selector.
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: ModeSetting,
    pub port_level: BTreeMap<u16, ModeSetting>,
    /// Position in the file, for "file order when no timestamp".
    pub index: usize,
}

impl PeerAuthentication {
    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `mtls STRICT, portLevelMtls 8080=PERMISSIVE`.
    fn mode_text(&self) -> String {
        let name = |m: ModeSetting| format!("{m:?}").to_uppercase();
        let mut out = format!("mtls {}", name(self.mode));
        for (port, &m) in &self.port_level {
            out.push_str(&format!(", port {port} {}", name(m)));
        }
        out
    }
}

/// Everything the policy file holds that l4mesh understands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySet {
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Documents that are not for a sidecar (other kinds, policies bound with targetRef).
    pub skipped: Vec<Skipped>,
    /// Documents l4mesh cannot use (invalid, or not what Istio accepts): each one is a
    /// problem only for the workloads it may apply to (see [`Broken::applies_to`]).
    pub broken: Vec<Broken>,
}

/// A document skipped on purpose.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub index: usize,
    /// ` (item 2: ConfigMap shop/x)`, as errors name documents.
    pub what: String,
    pub why: String,
}

/// A document that could not be read, and where (as far as can be told) it applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Broken {
    pub path: std::path::PathBuf,
    pub index: usize,
    pub what: String,
    pub message: String,
    scope: Scope,
}

impl Broken {
    /// The error, as the file's other errors are written.
    pub fn error(&self) -> PolicyError {
        PolicyError::Invalid {
            path: self.path.clone(),
            index: self.index,
            what: self.what.clone(),
            message: self.message.clone(),
        }
    }

    /// Whether the document could apply to `workload`: `Err(why not)` only when what can be
    /// read of it (kind, namespace, selector, targetRef) says it cannot. Anything unreadable
    /// counts as "could": a broken policy must never be dropped where it might be in force.
    pub fn applies_to(&self, workload: &Workload, root: &str) -> Result<(), String> {
        let s = &self.scope;
        if s.target_ref {
            return Err("it is bound with targetRef (gateways and waypoints, not sidecars)".into());
        }
        let Some(ns) = &s.namespace else {
            return Ok(());
        };
        if *ns != workload.namespace && *ns != root {
            return Err(format!("it is in namespace {ns}"));
        }
        match &s.selector {
            SelectorScope::Unreadable | SelectorScope::None => Ok(()),
            SelectorScope::Labels(_) if s.kind == "PeerAuthentication" && *ns == root => Err(
                "a PeerAuthentication with a selector in the root namespace applies nowhere".into(),
            ),
            SelectorScope::Labels(labels) => {
                if labels
                    .iter()
                    .all(|(k, v)| workload.labels.get(k) == Some(v))
                {
                    Ok(())
                } else {
                    Err(format!(
                        "its selector {} does not match",
                        authz::labels_text(labels)
                    ))
                }
            }
        }
    }
}

/// What can be read of a document's reach without trusting the rest of it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Scope {
    kind: String,
    namespace: Option<String>,
    selector: SelectorScope,
    target_ref: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
enum SelectorScope {
    #[default]
    None,
    Labels(BTreeMap<String, String>),
    Unreadable,
}

impl Scope {
    fn of(value: &serde_yaml::Value) -> Scope {
        let text = |v: Option<&serde_yaml::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
        let spec = value.get("spec");
        let selector = match spec.and_then(|s| s.get("selector")) {
            None | Some(serde_yaml::Value::Null) => SelectorScope::None,
            Some(sel) => match sel.get("matchLabels") {
                None | Some(serde_yaml::Value::Null) => SelectorScope::None,
                Some(serde_yaml::Value::Mapping(m)) => m
                    .iter()
                    .map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                    .collect::<Option<BTreeMap<_, _>>>()
                    .map_or(SelectorScope::Unreadable, |labels| {
                        if labels.is_empty() {
                            SelectorScope::None
                        } else {
                            SelectorScope::Labels(labels)
                        }
                    }),
                Some(_) => SelectorScope::Unreadable,
            },
        };
        let kind = text(value.get("kind")).unwrap_or_default();
        let target_ref = kind == "AuthorizationPolicy"
            && spec.is_some_and(|s| s.get("targetRef").is_some() || s.get("targetRefs").is_some());
        Scope {
            kind,
            namespace: text(value.get("metadata").and_then(|m| m.get("namespace"))),
            selector,
            target_ref,
        }
    }
}

/// A policy file that cannot be used; says which document and field.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: empty: no policy documents (a failed or unfinished write?); to remove every policy on purpose, write `apiVersion: v1`, `kind: List`, `items: []`")]
    Empty { path: std::path::PathBuf },
    #[error("{path}: document {index}{what}: {message}")]
    Invalid {
        path: std::path::PathBuf,
        index: usize,
        what: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    kind: Option<String>,
    api_version: Option<String>,
}

/// A field that may be left out but, when written, must say something: `mtls:` with nothing
/// after it is what a file cut off mid-write looks like, and reading it as "UNSET" would
/// silently turn STRICT into PERMISSIVE (issue 13).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    match Option::<T>::deserialize(d)? {
        Some(v) => Ok(Some(v)),
        None => Err(serde::de::Error::custom(
            "is empty (a file cut off mid-write?); leave the field out, or write `mode: UNSET` to inherit",
        )),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPeerAuthentication {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: RawMetadata,
    #[serde(default, deserialize_with = "present")]
    spec: Option<RawSpec>,
    /// What the API server reports (`kubectl get -o yaml` prints it): not policy, ignored.
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMetadata {
    name: String,
    /// Required: a shared file cannot know which namespace `kubectl apply` would have put
    /// a resource without one in, and guessing `default` moves a policy silently.
    namespace: Option<String>,
    #[serde(default)]
    creation_timestamp: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    // labels, uid, managedFields, ... are Kubernetes bookkeeping: accepted and ignored.
    #[serde(flatten)]
    _rest: BTreeMap<String, serde_yaml::Value>,
}

impl RawMetadata {
    fn namespace(&self) -> Result<String, String> {
        self.namespace.clone().ok_or_else(|| {
            "metadata.namespace: missing; write the namespace the policy is in (the root namespace for a mesh-wide one)".to_string()
        })
    }
}

/// Istio's `istio.io/dry-run` annotation, read as Go's `strconv.ParseBool` reads it.
fn dry_run(meta: &RawMetadata) -> Result<bool, String> {
    match meta.annotations.get(DRY_RUN).map(String::as_str) {
        None => Ok(false),
        Some("true" | "True" | "TRUE" | "t" | "T" | "1") => Ok(true),
        Some("false" | "False" | "FALSE" | "f" | "F" | "0") => Ok(false),
        Some(other) => Err(format!(
            "metadata.annotations.{DRY_RUN}: {other:?} is not \"true\" or \"false\""
        )),
    }
}

pub const DRY_RUN: &str = "istio.io/dry-run";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAuthorizationPolicy {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: RawMetadata,
    #[serde(default, deserialize_with = "present")]
    spec: Option<authz::Spec>,
    /// What the API server reports: not policy, ignored.
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_yaml::Value>,
}

fn empty_spec() -> authz::Spec {
    authz::Spec {
        selector: None,
        action: authz::Action::Allow,
        provider: None,
        rules: Vec::new(),
        target_ref: None,
        target_refs: None,
    }
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSpec {
    #[serde(default, deserialize_with = "present")]
    selector: Option<RawSelector>,
    #[serde(default, deserialize_with = "present")]
    mtls: Option<RawMtls>,
    #[serde(default)]
    port_level_mtls: BTreeMap<PortKey, Option<RawMtls>>,
}

/// A `portLevelMtls` key: a number, or a number in quotes (`"8080":`, as kubectl and JSON
/// print map keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortKey(u16);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u16),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(PortKey(n)),
            Raw::Text(t) => t.trim().parse().map(PortKey).map_err(|_| {
                serde::de::Error::custom(format!("port {t:?} is not a number from 0 to 65535"))
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    #[serde(default = "unset")]
    mode: ModeSetting,
}

fn unset() -> ModeSetting {
    ModeSetting::Unset
}

const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Istio security kinds that act at L7 only (JWT validation): nothing for an L4 sidecar to
/// enforce, skipped like other kinds. Any other kind in `security.istio.io` is an error, so a
/// typo such as `PeerAuthenticaton` cannot drop a policy silently.
const L7_ONLY_KINDS: [&str; 1] = ["RequestAuthentication"];

impl PolicySet {
    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<PolicySet, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        PolicySet::parse(path, &text)
    }

    /// Parses multi-document YAML; `path` only names the source in errors. Documents are
    /// numbered from 1, as a person counts them. Only what spoils the whole file is an error
    /// here (unreadable YAML, an empty file); a document that cannot be used is recorded in
    /// `broken`, for each workload to judge whether it matters to it.
    pub fn parse(path: &Path, text: &str) -> Result<PolicySet, PolicyError> {
        let mut set = PolicySet::default();
        // First pass: each document as plain YAML. A syntax error ends it: without valid
        // YAML there is no telling where one document stops (and serde_yaml's iterator keeps
        // yielding the error).
        let mut values = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = Option::<serde_yaml::Value>::deserialize(doc)
                .map_err(|e| yaml_error(path, i + 1, String::new(), e))?;
            values.push(value);
        }
        // An empty file is what a failed or half-done write leaves (`cmd > policy.yaml` that
        // died, a truncate not yet followed by the content): never read as "no policies",
        // which would loosen every STRICT port. Saying "no policies" takes an explicit
        // document: an empty List, as `kubectl get ... -o yaml` prints when there are none.
        if values.iter().all(Option::is_none) {
            return Err(PolicyError::Empty {
                path: path.to_path_buf(),
            });
        }
        // Second pass: each document read for real, from the text, so that errors carry
        // their line and column.
        for (i, (doc, value)) in serde_yaml::Deserializer::from_str(text)
            .zip(values)
            .enumerate()
        {
            let Some(value) = value else { continue }; // an empty document
            set.read(path, text, i + 1, None, &value, doc);
        }
        Ok(set)
    }

    /// Reads one document (or one item of a `kind: List`) into the set, or records it as
    /// broken.
    fn read<'de, D>(
        &mut self,
        path: &Path,
        text: &str,
        index: usize,
        item: Option<usize>,
        value: &serde_yaml::Value,
        doc: D,
    ) where
        D: serde::Deserializer<'de, Error = serde_yaml::Error>,
    {
        if item.is_none() && value.get("kind").and_then(|k| k.as_str()) == Some("List") {
            // `kubectl get ... -o yaml` prints a List: each item is read as a document of
            // its own (`items: []` says "no policies" on purpose).
            match value.get("items") {
                Some(serde_yaml::Value::Sequence(items)) => {
                    for (j, it) in items.iter().enumerate() {
                        if !it.is_null() {
                            self.read(path, text, index, Some(j + 1), it, it.clone());
                        }
                    }
                }
                None | Some(serde_yaml::Value::Null) => {}
                Some(_) => self.broken.push(Broken {
                    path: path.to_path_buf(),
                    index,
                    what: " (List)".into(),
                    message: "items: not a list".into(),
                    scope: Scope::default(),
                }),
            }
            return;
        }
        let what = describe(value, item);
        // What istiod's admission would refuse never takes effect in Istio: refused here
        // before it is given a meaning. A document that does not even read cleanly says
        // that first, and what istiod would refuse in it after.
        let refusals = validate::document(value);
        let refused = (!refusals.is_empty())
            .then(|| validate::message(&refusals, |at| validate::locate(text, index, item, at)));
        if let Err(message) = self.add_document(index, &what, value, doc, refused.as_deref()) {
            // An item was read from a `Value`, which has no positions: read it again from
            // the text to say where its error is.
            let mut message = item
                .and_then(|j| locate_item(text, index, j, value))
                .unwrap_or(message);
            if let Some(r) = refused.filter(|r| !message.contains(r.as_str())) {
                message = format!("{message}; {r}");
            }
            self.broken.push(Broken {
                path: path.to_path_buf(),
                index,
                what,
                message,
                scope: Scope::of(value),
            });
        }
    }

    /// Adds one document (not a List); `Err` is the message naming the field at fault.
    fn add_document<'de, D>(
        &mut self,
        index: usize,
        what: &str,
        value: &serde_yaml::Value,
        doc: D,
        refused: Option<&str>,
    ) -> Result<(), String>
    where
        D: serde::Deserializer<'de, Error = serde_yaml::Error>,
    {
        let message = |e: serde_yaml::Error| yaml_message(&e);
        let header = Header::deserialize(value).map_err(message)?;
        let kind = header.kind.unwrap_or_default();
        let api = header.api_version.unwrap_or_default();
        if kind.is_empty() {
            return Err(
                "no `kind:` (a file cut off mid-write?); every document must say what it is"
                    .to_string(),
            );
        }
        let security = api.starts_with("security.istio.io/");
        let skip = |set: &mut PolicySet, why: String| {
            set.skipped.push(Skipped {
                index,
                what: what.to_string(),
                why,
            });
            Ok(())
        };
        if kind != "PeerAuthentication" && kind != "AuthorizationPolicy" {
            if security && !L7_ONLY_KINDS.contains(&kind.as_str()) {
                return Err(format!(
                    "kind: {kind:?} is not a security.istio.io kind l4mesh knows (PeerAuthentication, AuthorizationPolicy, {})",
                    L7_ONLY_KINDS.join(", ")
                ));
            }
            let why = if security {
                "acts on HTTP requests only"
            } else {
                "not a security.istio.io policy"
            };
            return skip(self, why.to_string());
        }
        if !API_VERSIONS.contains(&api.as_str()) {
            return Err(format!(
                "apiVersion: {api:?} is not one of {}",
                API_VERSIONS.join(", ")
            ));
        }
        if kind == "AuthorizationPolicy" {
            let raw = RawAuthorizationPolicy::deserialize(doc).map_err(message)?;
            refused.map_or(Ok(()), |r| Err(r.to_string()))?;
            let namespace = raw.metadata.namespace()?;
            let spec = raw.spec.unwrap_or_else(empty_spec);
            // A policy bound with targetRef(s) applies to gateways and waypoints, never
            // to sidecars (Istio's sidecars ignore it): skipped, not an error.
            if spec.target_ref.is_some() || spec.target_refs.is_some() {
                return skip(
                    self,
                    "bound with targetRef: applies to gateways and waypoints, not sidecars"
                        .to_string(),
                );
            }
            let dry_run = dry_run(&raw.metadata)?;
            self.authorization_policies.push(AuthorizationPolicy {
                name: raw.metadata.name,
                namespace,
                spec,
                dry_run,
            });
            return Ok(());
        }
        let raw = RawPeerAuthentication::deserialize(doc).map_err(message)?;
        refused.map_or(Ok(()), |r| Err(r.to_string()))?;
        let namespace = raw.metadata.namespace()?;
        let created = match &raw.metadata.creation_timestamp {
            None => None,
            Some(ts) => Some(
                humantime::parse_rfc3339_weak(ts)
                    .map_err(|e| format!("metadata.creationTimestamp: {ts:?}: {e}"))?,
            ),
        };
        let spec = raw.spec.unwrap_or_default();
        let selector = spec
            .selector
            .map(|s| s.match_labels)
            .filter(|labels| !labels.is_empty());
        let mut port_level = BTreeMap::new();
        for (PortKey(port), m) in spec.port_level_mtls {
            // `8080:` with nothing under it: cut off, not "inherit" (see `present`).
            let m = m.ok_or_else(|| {
                format!("spec.portLevelMtls.{port}: is empty (a file cut off mid-write?); write `mode: UNSET` to inherit")
            })?;
            port_level.insert(port, m.mode);
        }
        self.peer_authentications.push(PeerAuthentication {
            name: raw.metadata.name,
            namespace,
            created,
            selector,
            mode: spec.mtls.map_or(ModeSetting::Unset, |m| m.mode),
            port_level,
            index,
        });
        Ok(())
    }
}

/// Item `item` (from 1) of the `kind: List` that is document `index` of `text`, deserialized
/// again from the text into its kind's type: its error's message, with line and column (the
/// item's first reading, from a `Value`, has none) and the field path from the item (the
/// item is already named). `None` when it reads cleanly this way (the
/// problem was not one of YAML shape) or its kind is not one l4mesh reads. Only run for an
/// item that failed, so reading the List from its start each time costs nothing otherwise.
fn locate_item(text: &str, index: usize, item: usize, value: &serde_yaml::Value) -> Option<String> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    #[derive(Clone, Copy)]
    enum Kind {
        Peer,
        Authz,
    }
    #[derive(Clone, Copy)]
    struct Probe {
        item: usize,
        kind: Kind,
    }
    struct Items(Probe);
    struct Item(Kind);

    impl<'de> DeserializeSeed<'de> for Probe {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Probe {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a List")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            // Keys of any type (a List's own keys are strings, but this runs on broken input).
            while let Some(key) = map.next_key::<serde_yaml::Value>()? {
                if key.as_str() == Some("items") {
                    map.next_value_seed(Items(self))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }
    impl<'de> DeserializeSeed<'de> for Items {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }
    impl<'de> Visitor<'de> for Items {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of items")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            for _ in 1..self.0.item {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(());
                }
            }
            seq.next_element_seed(Item(self.0.kind))?;
            // The rest is read past, so that a clean item ends in `Ok`, not in a complaint
            // about a list left half read.
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(())
        }
    }
    impl<'de> DeserializeSeed<'de> for Item {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            match self.0 {
                Kind::Peer => RawPeerAuthentication::deserialize(d).map(drop),
                Kind::Authz => RawAuthorizationPolicy::deserialize(d).map(drop),
            }
        }
    }

    let kind = match value.get("kind").and_then(|k| k.as_str()) {
        Some("PeerAuthentication") => Kind::Peer,
        Some("AuthorizationPolicy") => Kind::Authz,
        _ => return None,
    };
    let doc = serde_yaml::Deserializer::from_str(text).nth(index - 1)?;
    let e = Probe { item, kind }.deserialize(doc).err()?;
    let at = format!("items[{}]", item - 1);
    let message = yaml_message(&e);
    Some(if message.contains(&format!("{at}.")) {
        message.replacen(&format!("{at}."), "", 1)
    } else {
        message.replacen(&format!("{at}: "), "", 1)
    })
}

/// How errors and reports name a document: ` (item 2: PeerAuthentication shop/strict)`, read
/// leniently so that even a broken document gets a name.
fn describe(value: &serde_yaml::Value, item: Option<usize>) -> String {
    fn text(v: Option<&serde_yaml::Value>) -> &str {
        v.and_then(|v| v.as_str()).unwrap_or_default()
    }
    let meta = value.get("metadata");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .unwrap_or("(no namespace)");
    format!(
        " ({}{} {ns}/{})",
        item.map(|j| format!("item {j}: ")).unwrap_or_default(),
        text(value.get("kind")),
        text(meta.and_then(|m| m.get("name")))
    )
}

/// A serde_yaml error's message with its position (when it knows it) said once.
fn yaml_message(e: &serde_yaml::Error) -> String {
    match e.location() {
        Some(l) => {
            let m = crate::parse::yaml_message(e);
            format!("line {} column {}: {m}", l.line(), l.column())
        }
        None => e.to_string(),
    }
}

/// A document's YAML error, with its position (when serde_yaml knows it) said once.
fn yaml_error(path: &Path, index: usize, what: String, e: serde_yaml::Error) -> PolicyError {
    PolicyError::Invalid {
        path: path.to_path_buf(),
        index,
        what,
        message: yaml_message(&e),
    }
}

/// Everything the policy file says about one workload, resolved once per reload.
#[derive(Clone, Debug, Default)]
pub struct WorkloadPolicy {
    pub mtls: EffectiveMtls,
    pub authz: Authorizer,
    /// Broken documents that cannot apply here, and why (they block other workloads).
    pub broken_elsewhere: Vec<String>,
}

impl WorkloadPolicy {
    /// Resolves `set` for `workload`. A broken document that may apply to this workload is
    /// an error (the caller keeps the stricter state: the policy in force, or no start); one
    /// that cannot apply here is a warning.
    pub fn resolve(
        set: &PolicySet,
        workload: &Workload,
        root_namespace: &str,
    ) -> Result<WorkloadPolicy, PolicyError> {
        let mut broken_elsewhere = Vec::new();
        for b in &set.broken {
            match b.applies_to(workload, root_namespace) {
                Ok(()) => return Err(b.error()),
                Err(why) => broken_elsewhere.push(format!(
                    "document {}{} cannot be used ({}) and is skipped here: {why}",
                    b.index, b.what, b.message
                )),
            }
        }
        Ok(WorkloadPolicy {
            mtls: EffectiveMtls::resolve(set, workload, root_namespace),
            authz: Authorizer::compile(&set.authorization_policies, workload, root_namespace),
            broken_elsewhere,
        })
    }

    /// Everything a person should be told about this workload's policies.
    pub fn warnings(&self) -> impl Iterator<Item = &String> {
        self.mtls
            .warnings
            .iter()
            .chain(&self.authz.warnings)
            .chain(&self.broken_elsewhere)
    }
}

/// The workload a sidecar serves, as policies see it.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The mesh's trust domain and aliases: `cluster.local/...` principals stand for them.
    pub trust_domains: crate::identity::TrustDomains,
}

/// The resolved mode of every inbound port of one workload.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectiveMtls {
    /// Ports not listed below.
    pub default: (Mode, Source),
    /// Ports with their own `portLevelMtls`.
    pub ports: BTreeMap<u16, (Mode, Source)>,
    /// Things a person should know (ignored fields).
    pub warnings: Vec<String>,
    /// Every PeerAuthentication looked at: `namespace/name` and `Ok(how it applies)` or
    /// `Err(why it does not)` (for `check --explain`).
    pub considered: Vec<(String, Result<String, String>)>,
}

impl Default for EffectiveMtls {
    fn default() -> Self {
        EffectiveMtls {
            default: (
                Mode::Permissive,
                Source {
                    level: Level::Default,
                    resource: None,
                },
            ),
            ports: BTreeMap::new(),
            warnings: Vec::new(),
            considered: Vec::new(),
        }
    }
}

impl EffectiveMtls {
    /// Resolves `set` for `workload`; `root_namespace` holds the mesh-wide policy.
    pub fn resolve(set: &PolicySet, workload: &Workload, root_namespace: &str) -> EffectiveMtls {
        let mut out = EffectiveMtls::default();
        let oldest = |level: Level| {
            set.peer_authentications
                .iter()
                .filter(|pa| applies_at(pa, level, workload, root_namespace))
                // Oldest first; equal timestamps (they have one-second resolution) by name,
                // then namespace, as istiod orders them; without timestamps, file order.
                .min_by_key(|pa| {
                    let tie = pa
                        .created
                        .map(|_| (pa.name.as_str(), pa.namespace.as_str()));
                    (pa.created.is_none(), pa.created, tie, pa.index)
                })
        };
        let mut deciding = Vec::new();
        for level in [Level::Mesh, Level::Namespace, Level::Workload] {
            let Some(pa) = oldest(level) else { continue };
            deciding.push((pa.id(), level));
            if let Some(mode) = resolved(pa.mode) {
                out.default = (mode, source(level, pa));
            }
            // Port-level settings without a selector are refused when the file is read
            // (istiod refuses them), so only the workload level has any.
            if level != Level::Workload {
                continue;
            }
            for (&port, &setting) in &pa.port_level {
                // UNSET at port level inherits the workload's (already resolved) mode.
                let mode = resolved(setting).unwrap_or(out.default.0);
                out.ports
                    .insert(port, (mode, source(Level::Port(port), pa)));
            }
        }
        for pa in &set.peer_authentications {
            let id = pa.id();
            let level = [Level::Mesh, Level::Namespace, Level::Workload]
                .into_iter()
                .find(|&l| applies_at(pa, l, workload, root_namespace));
            let verdict = match level {
                Some(level) if deciding.contains(&(id.clone(), level)) => {
                    Ok(format!("{level} level, {}", pa.mode_text()))
                }
                Some(level) => Err(format!(
                    "{level} level, but an older one at that level decides (oldest creationTimestamp wins)"
                )),
                None => Err(why_not(pa, workload, root_namespace)),
            };
            out.considered.push((id, verdict));
        }
        out
    }

    /// The mode of `port`, and where it came from.
    pub fn mode_for(&self, port: u16) -> &(Mode, Source) {
        self.ports.get(&port).unwrap_or(&self.default)
    }
}

fn applies_at(pa: &PeerAuthentication, level: Level, w: &Workload, root: &str) -> bool {
    match (level, &pa.selector) {
        (Level::Mesh, None) => pa.namespace == root,
        (Level::Namespace, None) => pa.namespace == w.namespace && pa.namespace != root,
        // A selector in the root namespace: Istio applies it nowhere, not even to the root
        // namespace's own workloads.
        (Level::Workload, Some(labels)) => {
            pa.namespace == w.namespace
                && pa.namespace != root
                && labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
        }
        _ => false,
    }
}

/// Why a PeerAuthentication does not apply to `w`.
fn why_not(pa: &PeerAuthentication, w: &Workload, root: &str) -> String {
    match &pa.selector {
        Some(_) if pa.namespace == root => {
            "a selector in the root namespace: Istio applies it nowhere".to_string()
        }
        _ if pa.namespace != w.namespace && pa.namespace != root => format!(
            "another namespace ({}, the workload is in {})",
            pa.namespace, w.namespace
        ),
        Some(labels) => format!("selector {} does not match", authz::labels_text(labels)),
        None => "does not apply".to_string(),
    }
}

fn resolved(setting: ModeSetting) -> Option<Mode> {
    match setting {
        ModeSetting::Unset => None,
        ModeSetting::Disable => Some(Mode::Disable),
        ModeSetting::Permissive => Some(Mode::Permissive),
        ModeSetting::Strict => Some(Mode::Strict),
    }
}

fn source(level: Level, pa: &PeerAuthentication) -> Source {
    Source {
        level,
        resource: Some(pa.id()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file as a workload sees it: an error if the file is unusable or any document in
    /// it is broken.
    fn outcome(text: &str) -> Result<PolicySet, String> {
        let set = PolicySet::parse(Path::new("p.yaml"), text).map_err(|e| e.to_string())?;
        match set.broken.first() {
            Some(b) => Err(b.error().to_string()),
            None => Ok(set),
        }
    }

    fn parse_err(text: &str) -> String {
        outcome(text).unwrap_err()
    }

    /// What `kubectl get peerauthentications,authorizationpolicies -o yaml` adds to a
    /// resource (issue 17): API-server bookkeeping in metadata, a `status` stanza, port keys in
    /// quotes; and a targetRefs policy, which binds to waypoints and never to sidecars.
    /// `kubectl get -A -o yaml` prints one List: every item is read, none dropped.
    #[test]
    fn a_list_is_read_item_by_item() {
        let text = format!(
            "apiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: \"\"\nitems:\n{}\n{}",
            indent_item(pa("shop", "strict", None, "STRICT").trim_end_matches("---\n")),
            indent_item("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all\n  namespace: shop\nspec: {}\n"),
        );
        let set = PolicySet::parse(Path::new("p.yaml"), &text).unwrap();
        assert_eq!(set.peer_authentications.len(), 1);
        assert_eq!(set.peer_authentications[0].mode, ModeSetting::Strict);
        assert_eq!(set.authorization_policies.len(), 1);
        // A bad item is named by its place in the List.
        let bad = text.replace("mode: STRICT", "mode: STRICTLY");
        let err = parse_err(&bad);
        assert!(
            err.contains("document 1 (item 1: PeerAuthentication shop/strict)"),
            "{err}"
        );
        // ... and by its line and column in the file, as a document of its own is.
        let line = bad.lines().position(|l| l.contains("STRICTLY")).unwrap() + 1;
        let column = bad.lines().nth(line - 1).unwrap().find("STRICTLY").unwrap() + 1;
        assert!(
            err.contains(&format!(
                "line {line} column {column}: spec.mtls.mode: unknown variant `STRICTLY`"
            )),
            "{err}"
        );
        // The second item, after a good first one; an unknown field in an AuthorizationPolicy.
        let bad = text.replace(
            "spec: {}",
            "spec:
    rules: []
    actions: DENY",
        );
        let err = parse_err(&bad);
        let line = bad.lines().position(|l| l.contains("actions:")).unwrap() + 1;
        assert!(
            err.contains("document 1 (item 2: AuthorizationPolicy shop/deny-all): ")
                && err.contains(&format!(
                    "line {line} column 5: spec: unknown field `actions`"
                )),
            "{err}"
        );
        // A problem that is not one of YAML shape keeps its message (no position to give).
        let bad = text.replace("\n    namespace: shop\n  spec: {}", "\n  spec: {}");
        let err = parse_err(&bad);
        assert!(err.contains("metadata.namespace: missing"), "{err}");
    }

    /// A YAML document as an item of a `- ` list.
    fn indent_item(doc: &str) -> String {
        doc.lines()
            .enumerate()
            .map(|(i, l)| {
                if i == 0 {
                    format!("- {l}")
                } else {
                    format!("  {l}")
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn exported_resources_read_as_istio_reads_them() {
        let text = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: web
  namespace: shop
  uid: 4b1c
  resourceVersion: "123"
  generation: 2
  managedFields:
  - manager: kubectl
    operation: Update
spec:
  selector:
    matchLabels:
      app: web
  mtls:
    mode: PERMISSIVE
  portLevelMtls:
    "8080":
      mode: STRICT
    9090:
      mode: DISABLE
status:
  conditions: []
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: for-the-waypoint
  namespace: shop
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: web
  action: DENY
  rules:
  - {}
status:
  validationMessages: []
"#;
        let set = PolicySet::parse(Path::new("p.yaml"), text).unwrap();
        let pa = &set.peer_authentications[0];
        assert_eq!(pa.port_level.get(&8080), Some(&ModeSetting::Strict));
        assert_eq!(pa.port_level.get(&9090), Some(&ModeSetting::Disable));
        // The DENY-everything policy for the waypoint does not deny the sidecar's traffic.
        assert!(set.authorization_policies.is_empty());
        assert_eq!(set.skipped.len(), 1);
        assert!(set.skipped[0].why.contains("targetRef"));
        let bad = text.replace("\"8080\":", "\"http\":");
        let err = parse_err(&bad);
        assert!(err.contains("\"http\" is not a number"), "{err}");
    }

    fn pa(ns: &str, name: &str, selector: Option<&[(&str, &str)]>, mode: &str) -> String {
        let selector = selector
            .map(|labels| {
                let l: String = labels
                    .iter()
                    .map(|(k, v)| format!("        {k}: {v}\n"))
                    .collect();
                format!("  selector:\n    matchLabels:\n{l}")
            })
            .unwrap_or_default();
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{selector}  mtls:\n    mode: {mode}\n---\n"
        )
    }

    fn resolve(docs: &str, ns: &str, labels: &[(&str, &str)]) -> EffectiveMtls {
        let set = PolicySet::parse(Path::new("p.yaml"), docs).unwrap();
        let w = Workload {
            trust_domains: "cluster.local".into(),
            namespace: ns.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        EffectiveMtls::resolve(&set, &w, "istio-system")
    }

    fn mode(e: &EffectiveMtls, port: u16) -> (Mode, Option<String>, Level) {
        let (m, s) = e.mode_for(port);
        (*m, s.resource.clone(), s.level)
    }

    #[test]
    fn nothing_at_all_is_permissive() {
        let e = resolve("apiVersion: v1\nkind: List\nitems: []\n", "shop", &[]);
        assert_eq!(mode(&e, 80), (Mode::Permissive, None, Level::Default));
        let e = resolve(&pa("other", "x", None, "STRICT"), "shop", &[]);
        assert_eq!(mode(&e, 80).0, Mode::Permissive);
    }

    #[test]
    fn precedence_mesh_namespace_workload_port() {
        let mesh = pa("istio-system", "mesh", None, "STRICT");
        let ns = pa("shop", "ns", None, "PERMISSIVE");
        let wl = pa("shop", "cart", Some(&[("app", "cart")]), "DISABLE");
        let cart = [("app", "cart")];
        type Labels<'a> = &'a [(&'a str, &'a str)];
        let cases: Vec<(String, Labels, Mode, &str, Level)> = vec![
            (
                mesh.clone(),
                &cart,
                Mode::Strict,
                "istio-system/mesh",
                Level::Mesh,
            ),
            (
                format!("{mesh}{ns}"),
                &cart,
                Mode::Permissive,
                "shop/ns",
                Level::Namespace,
            ),
            (
                format!("{mesh}{ns}{wl}"),
                &cart,
                Mode::Disable,
                "shop/cart",
                Level::Workload,
            ),
            // The selector does not match: the namespace policy decides.
            (
                format!("{mesh}{ns}{wl}"),
                &[("app", "web")],
                Mode::Permissive,
                "shop/ns",
                Level::Namespace,
            ),
            // All selector labels must match.
            (
                format!(
                    "{mesh}{}",
                    pa(
                        "shop",
                        "two",
                        Some(&[("app", "cart"), ("v", "2")]),
                        "DISABLE"
                    )
                ),
                &cart,
                Mode::Strict,
                "istio-system/mesh",
                Level::Mesh,
            ),
        ];
        for (docs, labels, want, res, level) in cases {
            assert_eq!(
                mode(&resolve(&docs, "shop", labels), 8080),
                (want, Some(res.to_string()), level),
                "{docs}"
            );
        }
    }

    #[test]
    fn unset_inherits_from_the_level_above() {
        let docs = format!(
            "{}{}{}",
            pa("istio-system", "mesh", None, "STRICT"),
            pa("shop", "ns", None, "UNSET"),
            pa("shop", "cart", Some(&[("app", "cart")]), "UNSET")
        );
        let e = resolve(&docs, "shop", &[("app", "cart")]);
        assert_eq!(
            mode(&e, 80),
            (Mode::Strict, Some("istio-system/mesh".into()), Level::Mesh)
        );
        // UNSET everywhere, no mesh policy: PERMISSIVE.
        let docs = pa("shop", "ns", None, "UNSET");
        assert_eq!(mode(&resolve(&docs, "shop", &[]), 80).0, Mode::Permissive);
    }

    #[test]
    fn port_level_overrides_and_inherits() {
        let docs = format!(
            "{}apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: cart\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: cart\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: PERMISSIVE\n    9090:\n      mode: UNSET\n    25:\n      mode: DISABLE\n",
            pa("istio-system", "mesh", None, "PERMISSIVE")
        );
        let e = resolve(&docs, "shop", &[("app", "cart"), ("version", "v1")]);
        assert_eq!(
            mode(&e, 8080),
            (
                Mode::Permissive,
                Some("shop/cart".into()),
                Level::Port(8080)
            )
        );
        assert_eq!(
            mode(&e, 9090),
            (Mode::Strict, Some("shop/cart".into()), Level::Port(9090))
        );
        assert_eq!(mode(&e, 25).0, Mode::Disable);
        assert_eq!(
            mode(&e, 443),
            (Mode::Strict, Some("shop/cart".into()), Level::Workload)
        );
    }

    #[test]
    fn port_level_without_selector_is_refused_as_istiod_refuses_it() {
        let docs = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: ns\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n";
        let set = PolicySet::parse(Path::new("p.yaml"), docs).unwrap();
        let err = WorkloadPolicy::resolve(&set, &workload("shop", &[]), "istio-system")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "p.yaml: document 1 (PeerAuthentication shop/ns): line 9 column 3: spec.portLevelMtls: \
             portLevelMtls applies only to workloads chosen by a selector with labels, and a \
             namespace- or mesh-wide PeerAuthentication cannot have it (istiod refuses it: \
             \"mesh/namespace peer authentication cannot have port level mTLS\")"
        );
        // Another namespace's workloads are told, not blocked.
        let other = WorkloadPolicy::resolve(&set, &workload("web", &[]), "istio-system").unwrap();
        assert!(other.warnings().any(|w| w.contains("in namespace shop")));
    }

    #[test]
    fn oldest_wins_then_file_order() {
        let with_ts = |name: &str, ts: &str, m: &str| {
            pa("shop", name, None, m).replace(
                &format!("  name: {name}\n"),
                &format!("  name: {name}\n  creationTimestamp: \"{ts}\"\n"),
            )
        };
        let docs = format!(
            "{}{}{}",
            with_ts("newer", "2025-06-01T00:00:00Z", "STRICT"),
            with_ts("older", "2024-01-01T00:00:00Z", "DISABLE"),
            pa("shop", "no-timestamp", None, "PERMISSIVE")
        );
        assert_eq!(
            mode(&resolve(&docs, "shop", &[]), 1).1,
            Some("shop/older".into())
        );
        let docs = format!(
            "{}{}",
            pa("shop", "first", None, "STRICT"),
            pa("shop", "second", None, "DISABLE")
        );
        assert_eq!(
            mode(&resolve(&docs, "shop", &[]), 1).1,
            Some("shop/first".into())
        );
        // The same second: by name, whatever the file order (issue 17).
        let docs = format!(
            "{}{}",
            with_ts("zeta", "2024-01-01T00:00:00Z", "STRICT"),
            with_ts("alpha", "2024-01-01T00:00:00Z", "DISABLE"),
        );
        assert_eq!(
            mode(&resolve(&docs, "shop", &[]), 1).1,
            Some("shop/alpha".into())
        );
    }

    #[test]
    fn other_kinds_are_skipped_and_bad_documents_named() {
        let docs = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata: {{}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: a\n  namespace: shop\nspec: {{}}\n---\n{}",
            pa("shop", "x", None, "STRICT")
        );
        let set = PolicySet::parse(Path::new("p.yaml"), &docs).unwrap();
        assert_eq!(set.skipped.len(), 1);
        assert_eq!(set.skipped[0].what, " (ConfigMap (no namespace)/a)");
        assert_eq!(set.peer_authentications.len(), 1);
        assert_eq!(set.authorization_policies.len(), 1);
        // CUSTOM is read (it denies what its rules match: see authz).
        let custom = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ext\n  namespace: shop\nspec:\n  action: CUSTOM\n  provider:\n    name: opa\n  rules:\n  - {}\n";
        assert_eq!(outcome(custom).unwrap().authorization_policies.len(), 1);
        // No namespace: an error naming the document, not a silent `default`.
        let err = parse_err(&pa("shop", "n", None, "STRICT").replace("  namespace: shop\n", ""));
        assert!(
            err.contains(
                "document 1 (PeerAuthentication (no namespace)/n): metadata.namespace: missing"
            ),
            "{err}"
        );

        let cases = [
            (
                pa("shop", "x", None, "STRICTEST"),
                "document 1 (PeerAuthentication shop/x): line 8",
                "unknown variant `STRICTEST`",
            ),
            (
                format!(
                    "{}{}",
                    pa("shop", "ok", None, "STRICT"),
                    pa("shop", "y", None, "STRICT").replace("  mtls:", "  mTLS:")
                ),
                "document 2 (PeerAuthentication shop/y)",
                "unknown field `mTLS`",
            ),
            (
                pa("shop", "v", None, "STRICT")
                    .replace("security.istio.io/v1", "security.istio.io/v2"),
                "document 1 (PeerAuthentication shop/v)",
                "apiVersion",
            ),
            (
                pa("shop", "t", None, "STRICT")
                    .replace("  name: t\n", "  name: t\n  creationTimestamp: yesterday\n"),
                "document 1",
                "metadata.creationTimestamp",
            ),
            ("a: [unclosed\n".to_string(), "p.yaml: document 1", "line"),
        ];
        for (docs, at, what) in cases {
            let err = parse_err(&docs);
            assert!(err.starts_with("p.yaml: "), "{err}");
            assert!(err.contains(at), "{at}: {err}");
            assert!(err.contains(what), "{what}: {err}");
        }
    }

    /// Issue 13: each of these once loaded as "no policy" and turned STRICT into PERMISSIVE.
    #[test]
    fn empty_cut_off_and_misspelled_files_are_errors_not_permissive() {
        let strict = pa("shop", "x", None, "STRICT");
        let cut = |after: &str| {
            let end = strict.find(after).unwrap() + after.len();
            strict[..end].to_string()
        };
        let cases = [
            (String::new(), "empty"),
            ("\n# nothing but a comment\n---\n".to_string(), "empty"),
            (cut("mtls:"), "line 7 column 3: spec: is empty"),
            (cut("spec:"), "is empty"),
            (cut("mode:"), "mode"),
            (cut("metadata:"), "metadata"),
            (cut("apiVersion: security.istio.io/v1\n"), "no `kind:`"),
            (
                strict.replace("PeerAuthentication", "PeerAuthenticaton"),
                "\"PeerAuthenticaton\" is not a security.istio.io kind",
            ),
            (
                strict.replace("kind: PeerAuthentication\n", ""),
                "no `kind:`",
            ),
            (
                format!("apiVersion: v1\nkind: List\nitems:\n- {}", "kind: PeerAuthentication"),
                "document 1 (item 1: PeerAuthentication (no namespace)/): line 4 column 3: missing field `apiVersion`",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: p\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: a\n  portLevelMtls:\n    8080:\n".to_string(),
                "portLevelMtls",
            ),
        ];
        for (text, want) in cases {
            let err = outcome(&text)
                .map(|set| format!("parsed as {set:?}"))
                .unwrap_or_else(|e| e);
            assert!(err.starts_with("p.yaml: "), "{text:?}: {err}");
            assert!(err.contains(want), "{text:?}: want {want:?}, got {err}");
        }
        // Removing every policy on purpose: an empty List (what kubectl prints for none).
        let none = PolicySet::parse(
            Path::new("p.yaml"),
            "apiVersion: v1\nkind: List\nitems: []\n",
        )
        .unwrap();
        assert_eq!(none, PolicySet::default());
        // Istio's L7-only kind is skipped, not an error; other API groups' kinds likewise.
        let jwt = format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\nspec: {{}}\n---\n{strict}"
        );
        let set = PolicySet::parse(Path::new("p.yaml"), &jwt).unwrap();
        assert_eq!(set.skipped.len(), 1);
        assert!(set.skipped[0].what.contains("RequestAuthentication"));
        assert_eq!(set.peer_authentications.len(), 1);
    }

    fn workload(ns: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            trust_domains: "cluster.local".into(),
        }
    }

    fn peer<'a>(principal: Option<&'a str>, port: u16) -> authz::Peer<'a> {
        let parts: Vec<&str> = principal
            .map(|p| p.split('/').collect())
            .unwrap_or_default();
        authz::Peer {
            principal,
            namespace: parts.get(2).copied(),
            service_account: parts.get(4).copied(),
            source_ip: "10.1.2.3".parse().unwrap(),
            destination: std::net::SocketAddr::new("10.1.2.4".parse().unwrap(), port),
        }
    }

    /// Issue 17's "done means": a policy file exported the way kubectl prints it loads and
    /// applies as Istio would, and its one broken document (in another namespace) blocks
    /// only the workloads it could apply to.
    #[test]
    fn a_kubectl_export_loads_and_applies_as_istio_would() {
        let path = Path::new("tests/fixtures/policy/kubectl-export.yaml");
        let set = PolicySet::parse(
            path,
            include_str!("../tests/fixtures/policy/kubectl-export.yaml"),
        )
        .unwrap();
        let cart = workload("shop", &[("app", "cart")]);
        let p = WorkloadPolicy::resolve(&set, &cart, "istio-system").unwrap();
        assert_eq!(p.mtls.mode_for(8080).0, Mode::Strict);
        assert_eq!(p.mtls.mode_for(9102).0, Mode::Permissive);
        let decide = |principal, port| p.authz.decide(&peer(principal, port)).decision;
        assert_eq!(
            decide(Some("cluster.local/ns/shop/sa/web"), 8080).policy_label(),
            "shop/cart-callers"
        );
        assert!(decide(Some("cluster.local/ns/monitoring/sa/prom"), 9102).is_allowed());
        assert!(!decide(Some("cluster.local/ns/monitoring/sa/prom"), 8080).is_allowed());
        // CUSTOM without the provider: what its rules match is denied.
        assert_eq!(
            decide(Some("cluster.local/ns/legacy/sa/old"), 9200).policy_label(),
            "shop/ext-authz"
        );
        // The waypoint's deny-all does not touch the sidecar.
        assert_eq!(set.skipped.len(), 1);
        assert!(p
            .warnings()
            .any(|w| w.contains("reporting/reports-typo") && w.contains("in namespace reporting")));
        // The workloads the broken document may apply to keep what they have.
        let reports = workload("reporting", &[("app", "reports")]);
        let err = WorkloadPolicy::resolve(&set, &reports, "istio-system")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("document 1 (item 8: AuthorizationPolicy reporting/reports-typo)")
                && err.contains("unknown field `principal`"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_document_blocks_only_the_workloads_it_may_apply_to() {
        let bad = |ns: Option<&str>, selector: Option<&str>, kind: &str| {
            let ns = ns
                .map(|n| format!("  namespace: {n}\n"))
                .unwrap_or_default();
            let selector = selector
                .map(|s| format!("  selector:\n    matchLabels:\n      app: {s}\n"))
                .unwrap_or_default();
            let body = if kind == "PeerAuthentication" {
                "  mtls:\n    mode: STRICTER\n"
            } else {
                "  rules:\n  - from:\n    - source:\n        principal: [x]\n"
            };
            format!("apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: bad\n{ns}spec:\n{selector}{body}---\n")
        };
        let good = pa("shop", "ok", None, "STRICT");
        let cart = workload("shop", &[("app", "cart")]);
        let cases = [
            (bad(Some("web"), None, "AuthorizationPolicy"), true),
            (bad(Some("shop"), Some("web"), "AuthorizationPolicy"), true),
            (bad(Some("shop"), Some("cart"), "AuthorizationPolicy"), false),
            (bad(Some("shop"), None, "PeerAuthentication"), false),
            (bad(Some("istio-system"), None, "PeerAuthentication"), false),
            // Istio applies a root-namespace PeerAuthentication with a selector nowhere.
            (bad(Some("istio-system"), Some("cart"), "PeerAuthentication"), true),
            // A root-namespace AuthorizationPolicy's selector matches in every namespace.
            (bad(Some("istio-system"), Some("cart"), "AuthorizationPolicy"), false),
            // No namespace: it could be anywhere.
            (bad(None, Some("web"), "AuthorizationPolicy"), false),
            ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: x\n  namespace: [shop]\nspec: {}\n---\n".to_string(), false),
        ];
        for (broken, usable) in cases {
            let text = format!("{broken}{good}");
            let set = PolicySet::parse(Path::new("p.yaml"), &text).unwrap();
            let r = WorkloadPolicy::resolve(&set, &cart, "istio-system");
            assert_eq!(r.is_ok(), usable, "{broken}: {:?}", r.as_ref().err());
            match r {
                // The good document still applies; the broken one is named in a warning.
                Ok(p) => {
                    assert_eq!(p.mtls.mode_for(80).0, Mode::Strict);
                    assert!(p.warnings().any(|w| w.contains("document 1")), "{broken}");
                }
                Err(e) => assert!(e.to_string().contains("p.yaml: document 1"), "{e}"),
            }
        }
    }

    #[test]
    fn a_root_namespace_selector_applies_nowhere() {
        let docs = pa("istio-system", "sel", Some(&[("app", "gw")]), "STRICT");
        let gw = workload("istio-system", &[("app", "gw")]);
        let set = PolicySet::parse(Path::new("p.yaml"), &docs).unwrap();
        let e = EffectiveMtls::resolve(&set, &gw, "istio-system");
        assert_eq!(e.mode_for(80).0, Mode::Permissive);
        assert!(e.considered[0]
            .1
            .as_ref()
            .unwrap_err()
            .contains("root namespace"));
    }

    #[test]
    fn the_dry_run_annotation_is_read_as_istio_reads_it() {
        let ap = |value: &str| {
            format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: d\n  namespace: shop\n  annotations:\n    istio.io/dry-run: \"{value}\"\nspec:\n  action: DENY\n  rules:\n  - {{}}\n")
        };
        for (value, dry) in [
            ("true", true),
            ("True", true),
            ("1", true),
            ("false", false),
        ] {
            let set = outcome(&ap(value)).unwrap();
            assert_eq!(set.authorization_policies[0].dry_run, dry, "{value}");
        }
        assert!(parse_err(&ap("yes")).contains("metadata.annotations.istio.io/dry-run: \"yes\""));
        // Enforced or not: a dry-run DENY of everything lets everyone in.
        let set = outcome(&ap("true")).unwrap();
        let p = WorkloadPolicy::resolve(&set, &workload("shop", &[]), "istio-system").unwrap();
        let v = p.authz.decide(&peer(None, 80));
        assert!(v.decision.is_allowed());
        assert_eq!(v.dry_run[0].decision, "deny");
    }

    /// The commented-out examples of a policy file, uncommented as a user would: from the
    /// `(examples start here)` line on, `## ` notes dropped, `# ` taken off.
    fn uncomment_examples(text: &str) -> String {
        let (head, examples) = text
            .split_once("(examples start here)")
            .expect("the examples marker");
        let mut out = head.to_string();
        out.push('\n');
        for line in examples.lines() {
            let line = line.trim_start();
            if line.starts_with("##") {
                continue;
            }
            out.push_str(
                line.strip_prefix("# ")
                    .unwrap_or(line.trim_start_matches('#')),
            );
            out.push('\n');
        }
        out
    }

    #[test]
    fn the_commented_authorization_examples_do_what_their_notes_say() {
        let text = uncomment_examples(include_str!("../config/policy.yaml"));
        let set = outcome(&text).unwrap();
        assert_eq!(set.authorization_policies.len(), 3);
        let cart = workload("shop", &[("app", "cart")]);
        let p = WorkloadPolicy::resolve(&set, &cart, "istio-system").unwrap();
        let decide = |principal, port| p.authz.decide(&peer(principal, port));
        assert!(decide(Some("cluster.local/ns/shop/sa/web"), 8080)
            .decision
            .is_allowed());
        assert!(!decide(Some("cluster.local/ns/shop/sa/web"), 9090)
            .decision
            .is_allowed());
        assert!(!decide(Some("cluster.local/ns/shop/sa/orders"), 8080)
            .decision
            .is_allowed());
        assert_eq!(
            decide(Some("cluster.local/ns/legacy/sa/web"), 8080)
                .decision
                .policy_label(),
            "shop/deny-legacy"
        );
        let v = decide(None, 8080);
        assert_eq!(v.dry_run[0].policy.as_ref(), "shop/require-mtls");
        assert_eq!(v.dry_run[0].decision, "deny");

        // The Kubernetes ConfigMap's examples, the same way.
        let cm: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../deploy/kubernetes/policy.yaml")).unwrap();
        let inner = cm["data"]["policy.yaml"].as_str().unwrap();
        let set = outcome(&uncomment_examples(inner)).unwrap();
        let api = workload("shop", &[("app", "api")]);
        let p = WorkloadPolicy::resolve(&set, &api, "istio-system").unwrap();
        assert_eq!(p.authz.counts(), (1, 1, 0));
        let v = p
            .authz
            .decide(&peer(Some("cluster.local/ns/shop/sa/frontend"), 8080));
        assert!(v.decision.is_allowed());
        assert!(p.authz.considered.iter().any(|c| c.dry_run));
    }

    #[test]
    fn the_example_policy_gives_the_cart_what_its_comments_say() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/policy.yaml"));
        let set = PolicySet::parse(path, include_str!("../config/policy.yaml")).unwrap();
        let cart = Workload {
            trust_domains: "cluster.local".into(),
            namespace: "shop".into(),
            labels: [("app".to_string(), "cart".to_string())].into(),
        };
        let e = EffectiveMtls::resolve(&set, &cart, "istio-system");
        assert_eq!(e.mode_for(8080).0, Mode::Strict);
        assert_eq!(e.mode_for(9102).0, Mode::Permissive);
        let elsewhere = Workload {
            namespace: "web".into(),
            ..Workload::default()
        };
        let e = EffectiveMtls::resolve(&set, &elsewhere, "istio-system");
        assert_eq!(e.mode_for(8080).0, Mode::Permissive);
    }
}
