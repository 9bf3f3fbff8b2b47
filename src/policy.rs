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
}

/// Everything the policy file holds that l4mesh understands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySet {
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Documents of other kinds, skipped: `(index, kind)`.
    pub ignored: Vec<(usize, String)>,
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
    metadata: Option<HeaderMetadata>,
    /// Only read for `kind: List`.
    items: Option<Vec<serde_yaml::Value>>,
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
struct HeaderMetadata {
    name: Option<String>,
    namespace: Option<String>,
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
    /// Kubernetes' default namespace when omitted.
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    creation_timestamp: Option<String>,
    // labels, annotations, uid, ... are Kubernetes bookkeeping: accepted and ignored.
    #[serde(flatten)]
    _rest: BTreeMap<String, serde_yaml::Value>,
}

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

fn default_namespace() -> String {
    "default".to_string()
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
    /// numbered from 1, as a person counts them.
    pub fn parse(path: &Path, text: &str) -> Result<PolicySet, PolicyError> {
        let invalid = |index, what, e| yaml_error(path, index, what, e);
        let mut set = PolicySet::default();
        // First pass: what kind each document is. Stop at the first syntax error: serde_yaml's
        // document iterator keeps yielding it otherwise.
        let mut headers = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let header =
                Option::<Header>::deserialize(doc).map_err(|e| invalid(i + 1, String::new(), e))?;
            headers.push(header);
        }
        // An empty file is what a failed or half-done write leaves (`cmd > policy.yaml` that
        // died, a truncate not yet followed by the content): never read as "no policies",
        // which would loosen every STRICT port. Saying "no policies" takes an explicit
        // document: an empty List, as `kubectl get ... -o yaml` prints when there are none.
        if headers.iter().all(Option::is_none) {
            return Err(PolicyError::Empty {
                path: path.to_path_buf(),
            });
        }
        for (i, (doc, header)) in serde_yaml::Deserializer::from_str(text)
            .zip(headers)
            .enumerate()
        {
            let Some(header) = header else { continue }; // an empty document
            add_document(&mut set, path, i + 1, None, header, doc)?;
        }
        Ok(set)
    }
}

/// A document's YAML error, with its position (when serde_yaml knows it) said once.
fn yaml_error(path: &Path, index: usize, what: String, e: serde_yaml::Error) -> PolicyError {
    let message = match e.location() {
        Some(l) => {
            let m = crate::parse::yaml_message(&e);
            format!("line {} column {}: {m}", l.line(), l.column())
        }
        None => e.to_string(),
    };
    PolicyError::Invalid {
        path: path.to_path_buf(),
        index,
        what,
        message,
    }
}

/// Reads one document (or one item of a `kind: List`) into `set`: `doc` is the document
/// itself, `header` what it says it is. Skipped kinds return `Ok` without adding anything.
fn add_document<'de, D>(
    set: &mut PolicySet,
    path: &Path,
    index: usize,
    item: Option<usize>,
    header: Header,
    doc: D,
) -> Result<(), PolicyError>
where
    D: serde::Deserializer<'de, Error = serde_yaml::Error>,
{
    let invalid = |index, what, e| yaml_error(path, index, what, e);
    let fail = |index: usize, what: String, message: String| PolicyError::Invalid {
        path: path.to_path_buf(),
        index,
        what,
        message,
    };
    let kind = header.kind.clone().unwrap_or_default();
    let meta = header.metadata.as_ref();
    let what = format!(
        " ({}{kind} {}/{})",
        item.map(|j| format!("item {j}: ")).unwrap_or_default(),
        meta.and_then(|m| m.namespace.clone())
            .unwrap_or_else(default_namespace),
        meta.and_then(|m| m.name.clone()).unwrap_or_default()
    );
    let api = header.api_version.clone().unwrap_or_default();
    if kind.is_empty() {
        return Err(fail(
            index,
            String::new(),
            "no `kind:` (a file cut off mid-write?); every document must say what it is"
                .to_string(),
        ));
    }
    if kind == "List" {
        // `kubectl get ... -o yaml` prints a List: each item is read as a document of its
        // own (`items: []` says "no policies" on purpose).
        for (j, value) in header.items.unwrap_or_default().into_iter().enumerate() {
            let header = Option::<Header>::deserialize(value.clone())
                .map_err(|e| invalid(index, format!(" (List item {})", j + 1), e))?;
            let Some(header) = header else { continue };
            add_document(set, path, index, Some(j + 1), header, value)?;
        }
        return Ok(());
    }
    let security = api.starts_with("security.istio.io/");
    if kind != "PeerAuthentication" && kind != "AuthorizationPolicy" {
        if security && !L7_ONLY_KINDS.contains(&kind.as_str()) {
            return Err(fail(
                    index,
                    what,
                    format!(
                        "kind: {kind:?} is not a security.istio.io kind l4mesh knows (PeerAuthentication, AuthorizationPolicy, {})",
                        L7_ONLY_KINDS.join(", ")
                    ),
                ));
        }
        set.ignored.push((index, kind));
        return Ok(());
    }
    if !API_VERSIONS.contains(&api.as_str()) {
        return Err(PolicyError::Invalid {
            path: path.to_path_buf(),
            index,
            what,
            message: format!(
                "apiVersion: {api:?} is not one of {}",
                API_VERSIONS.join(", ")
            ),
        });
    }
    if kind == "AuthorizationPolicy" {
        let raw = RawAuthorizationPolicy::deserialize(doc)
            .map_err(|e| invalid(index, what.clone(), e))?;
        let spec = raw.spec.unwrap_or_else(empty_spec);
        // A policy bound with targetRef(s) applies to gateways and waypoints, never
        // to sidecars (Istio's sidecars ignore it): skipped, not an error.
        if spec.target_ref.is_some() || spec.target_refs.is_some() {
            set.ignored
                .push((index, format!("AuthorizationPolicy{what} with targetRef")));
            return Ok(());
        }
        authz::check_spec(&spec).map_err(|message| PolicyError::Invalid {
            path: path.to_path_buf(),
            index,
            what: what.clone(),
            message,
        })?;
        set.authorization_policies.push(AuthorizationPolicy {
            name: raw.metadata.name,
            namespace: raw.metadata.namespace,
            spec,
        });
        return Ok(());
    }
    let raw =
        RawPeerAuthentication::deserialize(doc).map_err(|e| invalid(index, what.clone(), e))?;
    let created = match &raw.metadata.creation_timestamp {
        None => None,
        Some(ts) => Some(
            humantime::parse_rfc3339_weak(ts).map_err(|e| PolicyError::Invalid {
                path: path.to_path_buf(),
                index,
                what: what.clone(),
                message: format!("metadata.creationTimestamp: {ts:?}: {e}"),
            })?,
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
                fail(
                    index,
                    what.clone(),
                    format!("spec.portLevelMtls.{port}: is empty (a file cut off mid-write?); write `mode: UNSET` to inherit"),
                )
            })?;
        port_level.insert(port, m.mode);
    }
    set.peer_authentications.push(PeerAuthentication {
        name: raw.metadata.name,
        namespace: raw.metadata.namespace,
        created,
        selector,
        mode: spec.mtls.map_or(ModeSetting::Unset, |m| m.mode),
        port_level,
        index,
    });
    Ok(())
}

/// Everything the policy file says about one workload, resolved once per reload.
#[derive(Clone, Debug, Default)]
pub struct WorkloadPolicy {
    pub mtls: EffectiveMtls,
    pub authz: Authorizer,
}

impl WorkloadPolicy {
    pub fn resolve(set: &PolicySet, workload: &Workload, root_namespace: &str) -> WorkloadPolicy {
        WorkloadPolicy {
            mtls: EffectiveMtls::resolve(set, workload, root_namespace),
            authz: Authorizer::compile(
                &set.authorization_policies,
                &workload.namespace,
                &workload.labels,
                root_namespace,
            ),
        }
    }

    /// Everything a person should be told about this workload's policies.
    pub fn warnings(&self) -> impl Iterator<Item = &String> {
        self.mtls.warnings.iter().chain(&self.authz.warnings)
    }
}

/// The workload a sidecar serves, as policies see it.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
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
        for level in [Level::Mesh, Level::Namespace, Level::Workload] {
            let Some(pa) = oldest(level) else { continue };
            if let Some(mode) = resolved(pa.mode) {
                out.default = (mode, source(level, pa));
            }
            if level != Level::Workload {
                if !pa.port_level.is_empty() {
                    out.warnings.push(format!(
                        "PeerAuthentication {}: portLevelMtls applies only with a selector; ignored",
                        pa.id()
                    ));
                }
                continue;
            }
            for (&port, &setting) in &pa.port_level {
                // UNSET at port level inherits the workload's (already resolved) mode.
                let mode = resolved(setting).unwrap_or(out.default.0);
                out.ports
                    .insert(port, (mode, source(Level::Port(port), pa)));
            }
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
        (Level::Workload, Some(labels)) => {
            pa.namespace == w.namespace && labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
        }
        _ => false,
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
        let err = PolicySet::parse(Path::new("p.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("document 1 (item 1: PeerAuthentication shop/strict)"),
            "{err}"
        );
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
        assert_eq!(set.ignored.len(), 1);
        let bad = text.replace("\"8080\":", "\"http\":");
        let err = PolicySet::parse(Path::new("p.yaml"), &bad)
            .unwrap_err()
            .to_string();
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
    fn port_level_without_selector_is_ignored_with_a_warning() {
        let docs = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: ns\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n";
        let e = resolve(docs, "shop", &[]);
        assert_eq!(mode(&e, 8080).0, Mode::Strict);
        assert!(e.warnings[0].contains("portLevelMtls applies only with a selector"));
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
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata: {{}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: a\nspec: {{}}\n---\n{}",
            pa("shop", "x", None, "STRICT")
        );
        let set = PolicySet::parse(Path::new("p.yaml"), &docs).unwrap();
        assert_eq!(set.ignored, vec![(1, "ConfigMap".to_string())]);
        assert_eq!(set.peer_authentications.len(), 1);
        assert_eq!(set.authorization_policies.len(), 1);
        let custom = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ext\n  namespace: shop\nspec:\n  action: CUSTOM\n";
        let err = PolicySet::parse(Path::new("p.yaml"), custom)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("document 1 (AuthorizationPolicy shop/ext): spec.action: CUSTOM"),
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
            let err = PolicySet::parse(Path::new("p.yaml"), &docs)
                .unwrap_err()
                .to_string();
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
                "document 1 (item 1: PeerAuthentication default/): apiVersion",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: p\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: a\n  portLevelMtls:\n    8080:\n".to_string(),
                "portLevelMtls",
            ),
        ];
        for (text, want) in cases {
            let err = PolicySet::parse(Path::new("p.yaml"), &text)
                .map(|set| format!("parsed as {set:?}"))
                .unwrap_or_else(|e| e.to_string());
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
        assert_eq!(set.ignored, vec![(1, "RequestAuthentication".to_string())]);
        assert_eq!(set.peer_authentications.len(), 1);
    }

    #[test]
    fn the_example_policy_gives_the_cart_what_its_comments_say() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/policy.yaml"));
        let set = PolicySet::parse(path, include_str!("../config/policy.yaml")).unwrap();
        let cart = Workload {
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
