//! Parse, don't validate: the serde helper every YAML reader (config, policy, identity
//! patterns) uses to turn a string into a typed value, with the error placed on the value's
//! own line. Depends on nothing else in the crate.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Deserializes a string through `parse`, raising its error while the scalar is being read so
/// serde_yaml reports the value's own line and field (a `try_from` error would point at the
/// enclosing mapping instead).
pub fn from_str<'de, D, T, E>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, E>,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    E: fmt::Display,
{
    struct V<T, E> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, E>,
    }
    impl<T, E: fmt::Display> serde::de::Visitor<'_> for V<T, E> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<Er: serde::de::Error>(self, v: &str) -> Result<T, Er> {
            (self.parse)(v).map_err(Er::custom)
        }
    }
    d.deserialize_str(V { expecting, parse })
}

/// A port (`8080`) or inclusive range (`"9000-9100"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("invalid port {p:?}: expected 1-65535"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(format!("invalid port range {s:?}: {first} > {last}"));
        }
        Ok(PortRange { first, last })
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a range like \"9000-9100\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortRange, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortRange, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortRange, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A serde_yaml error's message without the position it repeats (`at line L column C`): the
/// caller leads with that position once, as `file:line:column:`. Other positions in the
/// message (where a quoted scalar started, say) stay.
pub fn yaml_message(e: &serde_yaml::Error) -> String {
    let message = e.to_string();
    match e.location() {
        Some(l) => message.replace(&format!(" at line {} column {}", l.line(), l.column()), ""),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_yaml_error_states_its_position_once() {
        let e = serde_yaml::from_str::<serde_yaml::Value>("identity:\n  cert_chain: \"a\n  x: [\n")
            .unwrap_err();
        let m = super::yaml_message(&e);
        let at = e.location().unwrap();
        assert!(
            !m.contains(&format!("line {} column {}", at.line(), at.column())),
            "{m}"
        );
        assert!(
            m.contains("while scanning a quoted scalar at line 2"),
            "{m}"
        );
    }
}
