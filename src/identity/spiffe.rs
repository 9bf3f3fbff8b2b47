//! SPIFFE identities: the ID (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), how it is read from
//! a certificate's URI SAN, and the patterns destination rules pin servers with. The bottom of
//! the identity stack: everything else that names a workload uses these types.

use std::fmt;
use std::str::FromStr;

use rustls::pki_types::CertificateDer;
use thiserror::Error;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// A SPIFFE ID, `spiffe://<trust-domain>/<path>`; for workloads the path is
/// `/ns/<namespace>/sa/<service-account>` as Istio issues them.
///
/// ```
/// use l4mesh::identity::SpiffeId;
///
/// let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
/// assert_eq!(id.trust_domain(), "cluster.local");
/// assert_eq!(id.namespace_and_service_account(), Some(("shop", "cart")));
/// assert!("spiffe://cluster.local/ns//sa/cart".parse::<SpiffeId>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

/// Why a string is not a SPIFFE ID (as the SPIFFE ID specification defines it).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("does not start with spiffe://")]
    Scheme,
    #[error("empty trust domain")]
    EmptyTrustDomain,
    #[error("trust domain may hold only a-z, 0-9, '.', '-' and '_'")]
    TrustDomainChars,
    #[error("path segments must be non-empty and hold only letters, digits, '.', '-' and '_'")]
    PathChars,
    #[error("longer than 2048 bytes")]
    TooLong,
}

impl SpiffeId {
    /// The Istio-style identity of a workload: `spiffe://td/ns/NS/sa/SA`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path after the trust domain, starting with `/` (or empty).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The ID as Istio's AuthorizationPolicies name it: without `spiffe://`
    /// (`cluster.local/ns/shop/sa/web`).
    pub fn principal(&self) -> String {
        format!("{}{}", self.trust_domain(), self.path())
    }

    /// `(namespace, service account)` when the path has the Istio `/ns/X/sa/Y` shape.
    pub fn namespace_and_service_account(&self) -> Option<(&str, &str)> {
        let mut parts = self.path.strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// Whether this is the workload `namespace`/`service_account` (in whatever trust domain
    /// it is: the verifier decided which domains are accepted).
    pub fn runs_as(&self, namespace: &str, service_account: &str) -> bool {
        self.namespace_and_service_account() == Some((namespace, service_account))
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 2048 {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        let td_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c);
        if !td.chars().all(td_ok) {
            return Err(SpiffeIdError::TrustDomainChars);
        }
        if !path.is_empty() {
            let seg_ok = |c: char| c.is_ascii_alphanumeric() || ".-_".contains(c);
            let bad = path[1..]
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == ".." || !seg.chars().all(seg_ok));
            if bad {
                return Err(SpiffeIdError::PathChars);
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

/// Why a certificate carries no usable workload identity.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CertIdentityError {
    #[error("not a valid X.509 certificate: {0}")]
    Malformed(String),
    #[error("has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("has {0} URI SANs; an X.509-SVID has exactly one URI SAN, its SPIFFE ID")]
    SeveralUris(usize),
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    BadSpiffeId { uri: String, reason: SpiffeIdError },
}

/// The SPIFFE ID in a certificate's URI SAN. Identity only ever comes from here: a CN or DNS
/// SAN that looks like a principal grants nothing.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, CertIdentityError> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| CertIdentityError::Malformed(e.to_string()))?;
    spiffe_id_in(&x509)
}

/// A verified peer's SPIFFE ID (if it has a valid one) and serial (hex), from one parse of its
/// certificate: this runs once per handshake.
pub fn id_and_serial(cert: &CertificateDer<'_>) -> (Option<SpiffeId>, String) {
    match X509Certificate::from_der(cert.as_ref()) {
        Ok((_, x509)) => (
            spiffe_id_in(&x509).ok(),
            hex(x509.tbs_certificate.raw_serial()),
        ),
        Err(_) => (None, "?".to_string()),
    }
}

fn spiffe_id_in(x509: &X509Certificate<'_>) -> Result<SpiffeId, CertIdentityError> {
    let san = x509
        .subject_alternative_name()
        .map_err(|e| CertIdentityError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    // The SPIFFE X.509-SVID spec: exactly one URI SAN. A second one (`https://...`) could
    // mean another identity to some other verifier; refuse rather than pick.
    match uris.as_slice() {
        [uri] if uri.starts_with("spiffe://") => {
            uri.parse()
                .map_err(|reason| CertIdentityError::BadSpiffeId {
                    uri: uri.to_string(),
                    reason,
                })
        }
        [] | [_] => Err(CertIdentityError::NoSpiffeId),
        several => Err(CertIdentityError::SeveralUris(several.len())),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate's serial number, as its bytes.
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, String> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).map_err(|e| e.to_string())?;
    Ok(x509.tbs_certificate.raw_serial().to_vec())
}

/// A certificate's serial number in lowercase hex (for logs; `?` if unreadable).
pub fn serial_hex(cert: &CertificateDer<'_>) -> String {
    serial_of(cert)
        .map(|s| hex(&s))
        .unwrap_or_else(|_| "?".to_string())
}

/// A SPIFFE ID pattern a destination's server must match: exact, or with one leading or
/// trailing `*` (as Istio principals are written).
///
/// ```
/// use l4mesh::identity::IdentityPattern;
///
/// let pattern = IdentityPattern::try_from("spiffe://cluster.local/ns/payments/*".to_string()).unwrap();
/// assert!(pattern.matches(&"spiffe://cluster.local/ns/payments/sa/api".parse().unwrap()));
/// assert!(!pattern.matches(&"spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap()));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(into = "String")]
pub struct IdentityPattern(String, Glob);

impl<'de> serde::Deserialize<'de> for IdentityPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::parse::from_str(
            d,
            "a SPIFFE ID, optionally with one leading or trailing *",
            |s| IdentityPattern::try_from(s.to_string()),
        )
    }
}

impl TryFrom<String> for IdentityPattern {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let stars = s.matches('*').count();
        let ok = match stars {
            0 => s.parse::<SpiffeId>().map(|_| ()).map_err(|e| e.to_string()),
            1 if s.starts_with('*') || s.ends_with('*') => Ok(()),
            _ => Err("only one leading or trailing '*' is allowed".to_string()),
        };
        ok.map(|_| {
            let glob = Glob::new(&s);
            IdentityPattern(s, glob)
        })
        .map_err(|reason| format!("invalid identity pattern {reason}"))
    }
}

impl From<IdentityPattern> for String {
    fn from(p: IdentityPattern) -> String {
        p.0
    }
}

impl IdentityPattern {
    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        self.1.matches(Some(&id.to_string()))
    }
}

/// The one pattern matcher for identities, as Istio writes them: exact, `*`, `prefix*` or
/// `*suffix`. AuthorizationPolicy principals and namespaces and destination rules' server
/// identities all match through it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Glob {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*` anywhere, each matching any run of characters: only AuthorizationPolicy
    /// namespaces, which Istio's sidecars match as a regular expression with `*` as `.*`.
    Pieces(Vec<String>),
}

impl Glob {
    pub fn new(s: &str) -> Glob {
        if s == "*" {
            Glob::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Glob::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            Glob::Suffix(p.to_string())
        } else {
            Glob::Exact(s.to_string())
        }
    }

    /// A namespace pattern: as [`Glob::new`], and a `*` in the middle matches too
    /// (`prod-*-eu` matches `prod-web-eu`), as in Istio's sidecars.
    pub fn namespace(s: &str) -> Glob {
        let inner = s.len() > 1 && s[1..s.len() - 1].contains('*');
        if inner {
            Glob::Pieces(s.split('*').map(str::to_string).collect())
        } else {
            Glob::new(s)
        }
    }

    /// A value that is absent (a plaintext peer has no principal) matches no pattern, not
    /// even `*`: `principals: ["*"]` means "any authenticated peer".
    #[inline]
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else { return false };
        match self {
            Glob::Any => true,
            Glob::Exact(e) => v == e,
            Glob::Prefix(p) => v.starts_with(p.as_str()),
            Glob::Suffix(s) => v.ends_with(s.as_str()),
            Glob::Pieces(pieces) => pieces_match(pieces, v),
        }
    }
}

#[cold]
#[inline(never)]
/// Whether `v` is `pieces` joined by runs of any characters: the first piece a prefix, the
/// last a suffix, the others in order between them, none overlapping.
fn pieces_match(pieces: &[String], v: &str) -> bool {
    let (Some(first), Some(last)) = (pieces.first(), pieces.last()) else {
        return true;
    };
    if v.len() < first.len() + last.len() || !v.starts_with(first.as_str()) {
        return false;
    }
    let (mut rest, end) = (&v[first.len()..], v.len() - first.len() - last.len());
    if !v.ends_with(last.as_str()) {
        return false;
    }
    rest = &rest[..end];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece.as_str()) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// The mesh's trust domain and its aliases (Istio's `meshConfig.trustDomainAliases`): during
/// a trust-domain migration, workloads still holding certificates of an old domain are the
/// same workloads. Peers in any of them are accepted; a policy principal naming any of them,
/// or `cluster.local` (Istio's pointer to "the local trust domain"), names them all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustDomains {
    local: String,
    aliases: Vec<String>,
}

impl TrustDomains {
    /// `aliases` without repeats, and without `local` itself.
    pub fn new(local: &str, aliases: &[String]) -> TrustDomains {
        let mut kept: Vec<String> = Vec::new();
        for a in aliases {
            if a != local && !kept.contains(a) {
                kept.push(a.clone());
            }
        }
        TrustDomains {
            local: local.to_string(),
            aliases: kept,
        }
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn aliases(&self) -> &[String] {
        &self.aliases
    }

    /// Whether a peer of trust domain `td` belongs to this mesh.
    pub fn contains(&self, td: &str) -> bool {
        td == self.local || self.aliases.iter().any(|a| a == td)
    }

    /// The principals a policy's `principal` stands for. A full workload principal
    /// (`td/ns/NS/sa/SA`) whose trust domain is this mesh's, an alias or `cluster.local`
    /// becomes one per domain of the mesh, as istiod expands them; anything else (another
    /// domain, a pattern such as `*/ns/a/sa/b` or `td/ns/a/*`) stays as written.
    pub fn principals(&self, principal: &str) -> Vec<String> {
        let mut parts = principal.splitn(2, '/');
        let (Some(td), Some(rest)) = (parts.next(), parts.next()) else {
            return vec![principal.to_string()];
        };
        let full = rest.split('/').count() == 4;
        if !full || !(td == "cluster.local" || self.contains(td)) {
            return vec![principal.to_string()];
        }
        std::iter::once(&self.local)
            .chain(&self.aliases)
            .map(|d| format!("{d}/{rest}"))
            .collect()
    }
}

impl fmt::Display for TrustDomains {
    /// `example.org`, or `example.org (aliases old.org, older.org)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.local)?;
        if !self.aliases.is_empty() {
            write!(f, " (aliases {})", self.aliases.join(", "))?;
        }
        Ok(())
    }
}

impl From<&str> for TrustDomains {
    fn from(local: &str) -> TrustDomains {
        TrustDomains::new(local, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_patterns_match_a_star_anywhere() {
        let cases = [
            ("prod-*-eu", "prod-web-eu", true),
            ("prod-*-eu", "prod--eu", true),
            ("prod-*-eu", "prod-eu", false),
            ("prod-*-eu", "prod-web-us", false),
            ("a*b*c", "a-x-b-y-c", true),
            ("a*b*c", "acb", false),
            ("a*b*c", "abc", true),
            ("*-eu", "web-eu", true),
            ("prod-*", "prod-web", true),
            ("*", "anything", true),
            ("web", "web", true),
            ("web", "web2", false),
        ];
        for (pattern, ns, want) in cases {
            assert_eq!(
                Glob::namespace(pattern).matches(Some(ns)),
                want,
                "{pattern} {ns}"
            );
        }
        // Principals keep Istio's exact/prefix/suffix: a `*` in the middle is a character.
        assert!(!Glob::new("a*c").matches(Some("abc")));
    }

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace_and_service_account(), Some(("default", "web")));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            SpiffeId::workload("td", "a", "b").unwrap().to_string(),
            "spiffe://td/ns/a/sa/b"
        );
    }

    #[test]
    fn rejects_malformed_ids() {
        let cases = [
            ("https://x/ns/a/sa/b", SpiffeIdError::Scheme),
            ("spiffe:///ns/a", SpiffeIdError::EmptyTrustDomain),
            ("spiffe://Cluster.local/x", SpiffeIdError::TrustDomainChars),
            ("spiffe://td/ns//sa/b", SpiffeIdError::PathChars),
            ("spiffe://td/ns/a/sa/b/", SpiffeIdError::PathChars),
            ("spiffe://td/ns/../sa/b", SpiffeIdError::PathChars),
            ("spiffe://td/ns/a?x=1", SpiffeIdError::PathChars),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>(), Err(want), "{input}");
        }
    }

    #[test]
    fn non_workload_paths_have_no_namespace() {
        let id: SpiffeId = "spiffe://td/gateway".parse().unwrap();
        assert_eq!(id.namespace_and_service_account(), None);
    }

    #[test]
    fn trust_domain_aliases_accept_peers_and_expand_principals_as_istiod_does() {
        let tds = TrustDomains::new(
            "new.org",
            &[
                "old.org".to_string(),
                "new.org".to_string(),
                "old.org".to_string(),
            ],
        );
        assert_eq!(tds.aliases(), ["old.org"]);
        assert_eq!(tds.to_string(), "new.org (aliases old.org)");
        assert!(tds.contains("new.org") && tds.contains("old.org"));
        assert!(!tds.contains("other.org") && !tds.contains("cluster.local"));
        let both = ["new.org/ns/a/sa/b", "old.org/ns/a/sa/b"];
        for p in [
            "new.org/ns/a/sa/b",
            "old.org/ns/a/sa/b",
            "cluster.local/ns/a/sa/b",
        ] {
            assert_eq!(tds.principals(p), both, "{p}");
        }
        for p in [
            "other.org/ns/a/sa/b",
            "old.org/ns/a/*",
            "*/ns/a/sa/b",
            "*",
            "old.org",
        ] {
            assert_eq!(tds.principals(p), [p], "{p}");
        }
        // Without aliases: only `cluster.local` is rewritten, to the local domain.
        let one = TrustDomains::from("example.org");
        assert_eq!(
            one.principals("cluster.local/ns/a/sa/b"),
            ["example.org/ns/a/sa/b"]
        );
        assert_eq!(one.principals("cluster.local/ns/*"), ["cluster.local/ns/*"]);
    }
}
