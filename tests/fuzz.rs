//! Property-based fuzzing (proptest, on stable) of everything that parses outside input: the
//! first bytes of a connection, the policy file, the sidecar config. Bounded: a fixed number of
//! cases each, a few seconds in all. Nothing may panic; the sniffer never asks for more than
//! its limit.

use std::path::Path;

use l4mesh::config::Config;
use l4mesh::policy::PolicySet;
use l4mesh::proxy::sniff::{classify, Protocol, Verdict};
use l4mesh::tls::MESH_ALPN;
use proptest::prelude::*;

const LIMIT: usize = 2048;

fn client_hello() -> Vec<u8> {
    l4mesh::proxy::sniff::sample_client_hello(&[b"h2", MESH_ALPN])
}

/// A real ClientHello with some bytes changed, some removed, and some appended.
fn mutated_hello() -> impl Strategy<Value = Vec<u8>> {
    let hello = client_hello();
    let len = hello.len();
    (
        proptest::collection::vec((0..len, any::<u8>()), 0..8),
        0..=len,
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(move |(flips, cut, tail)| {
            let mut h = hello.clone();
            for (i, b) in flips {
                h[i] = b;
            }
            h.truncate(cut.max(1));
            h.extend(tail);
            h
        })
}

const POLICY: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: p\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: cart\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: PERMISSIVE\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: a\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/x\"]\n        ipBlocks: [\"10.0.0.0/8\"]\n    to:\n    - operation:\n        ports: [\"8080\"]\n    when:\n    - key: destination.port\n      values: [\"8080\"]\n";

const CONFIG: &str = "identity:\n  cert_chain: c.pem\n  private_key: k.pem\n  trust_bundle: r.pem\noutbound:\n  rules:\n    - cidrs: [10.0.0.0/8]\n      ports: [80, \"90-99\"]\n      action: mtls\n      server_identities: [\"spiffe://td/ns/a/*\"]\ndetection:\n  port_timeouts:\n    25: 100ms\n";

/// A text with some characters replaced, removed or inserted.
const LIST: &str = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.istio.io/v1\n  kind: PeerAuthentication\n  metadata:\n    name: p\n    namespace: shop\n  spec:\n    mtls:\n      mode: STRICT\n    portLevelMtls:\n      \"8080\":\n        mode: PERMISSIVE\n- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    name: a\n    namespace: shop\n  spec:\n    action: DENY\n    rules:\n    - from:\n      - source:\n          principals: [\"cluster.local/ns/shop/sa/x\"]\n";

fn mutated(text: &'static str) -> impl Strategy<Value = String> {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    proptest::collection::vec(
        (
            0..n,
            prop_oneof![Just(None), any::<char>().prop_map(Some)],
            any::<bool>(),
        ),
        0..6,
    )
    .prop_map(move |edits| {
        let mut c = chars.clone();
        for (i, ch, insert) in edits {
            let i = i.min(c.len().saturating_sub(1));
            match (ch, insert) {
                (None, _) if !c.is_empty() => {
                    c.remove(i);
                }
                (Some(ch), true) => c.insert(i, ch),
                (Some(ch), false) if !c.is_empty() => c[i] = ch,
                _ => {}
            }
        }
        c.into_iter().collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn random_first_bytes_never_panic_and_plaintext_decides_at_once(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let verdict = classify(&bytes, MESH_ALPN, LIMIT);
        if let Some(&first) = bytes.first() {
            if first != 0x16 {
                prop_assert_eq!(verdict, Verdict::Done(Protocol::Plaintext));
            }
        }
    }

    #[test]
    fn mutated_client_hellos_never_panic_and_respect_the_limit(hello in mutated_hello()) {
        let verdict = classify(&hello, MESH_ALPN, LIMIT);
        if hello.len() >= LIMIT {
            prop_assert!(matches!(verdict, Verdict::Done(_)), "asked for more past the limit");
        }
        // Every prefix is classified too, as detection sees the stream grow.
        for cut in [1, hello.len() / 3, hello.len() / 2] {
            let _ = classify(&hello[..cut.max(1).min(hello.len())], MESH_ALPN, LIMIT);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn mutated_policy_files_parse_or_fail_cleanly(text in mutated(POLICY)) {
        if let Err(e) = PolicySet::parse(Path::new("p.yaml"), &text) {
            prop_assert!(e.to_string().starts_with("p.yaml: "), "{}", e);
        }
    }

    /// The same documents as `kubectl get -o yaml` prints them: items of a List, where a
    /// broken item is read a second time to say where its error is.
    #[test]
    fn mutated_policy_lists_parse_or_fail_cleanly(text in mutated(LIST)) {
        match PolicySet::parse(Path::new("p.yaml"), &text) {
            Err(e) => prop_assert!(e.to_string().starts_with("p.yaml: "), "{}", e),
            Ok(set) => {
                for b in &set.broken {
                    let e = b.error().to_string();
                    prop_assert!(e.starts_with("p.yaml: document 1"), "{}", e);
                }
            }
        }
    }

    #[test]
    fn random_policy_text_never_panics(text in ".{0,300}") {
        let _ = PolicySet::parse(Path::new("p.yaml"), &text);
    }

    #[test]
    fn mutated_configs_parse_or_fail_cleanly(text in mutated(CONFIG)) {
        if let Err(e) = Config::parse(Path::new("c.yaml"), &text) {
            prop_assert!(e.to_string().starts_with("c.yaml"), "{}", e);
        }
    }
}
