//! Live state, learned in band: what `proxy::outbound`'s `auto` found out about destinations
//! by dialling their tunnel port. A refusal (no sidecar there) is remembered for a while so
//! later connections skip the probe, then forgotten so a destination that joins the mesh is
//! tunnelled to. An answer (a sidecar there) is remembered too: a destination that answered
//! recently is not downgraded by a refusal, which is a restart far more often than a sidecar
//! taken away (issue 24).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses remembered per side, at most this many each. Past it, expired ones are dropped,
/// and if none has expired the new one is not remembered: a forgotten refusal costs a probe,
/// a forgotten answer leaves the next refusal to decide as if nothing were known.
const MAX: usize = 16 * 1024;

/// What `auto` learned about destinations' tunnel ports.
pub struct Unmeshed {
    /// Refused: reached in plaintext without asking again until then.
    refused: Memory,
    /// Answered as a sidecar: a refusal until then fails closed instead of downgrading.
    answered: Memory,
}

impl Unmeshed {
    /// `ttl`: how long a refusal is remembered (`outbound.unmeshed_ttl`); `sidecar_memory`:
    /// how long an answer is (`outbound.sidecar_memory`).
    pub fn new(ttl: Duration, sidecar_memory: Duration) -> Unmeshed {
        Unmeshed {
            refused: Memory::new(ttl),
            answered: Memory::new(sidecar_memory),
        }
    }

    /// Whether `ip` refused recently: no sidecar there.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.refused.contains(ip)
    }

    /// `ip`'s tunnel port refused. Returns `false`, and remembers nothing, when `ip` answered
    /// as a sidecar within `sidecar_memory`: that refusal is a sidecar restarting, and the
    /// connection must fail rather than go out in plaintext.
    pub fn refused(&self, ip: IpAddr) -> bool {
        if self.answered.contains(ip) {
            return false;
        }
        self.refused.insert(ip);
        true
    }

    /// `ip`'s tunnel port answered (a stream opened): a sidecar is there.
    pub fn answered(&self, ip: IpAddr) {
        self.answered.insert(ip);
        self.refused.remove(ip);
    }

    /// The destinations remembered as un-meshed now, with how long each has left.
    pub fn list(&self) -> Vec<(IpAddr, Duration)> {
        self.refused.list()
    }
}

/// Addresses, each until an instant.
struct Memory {
    ttl: Duration,
    until: Mutex<HashMap<IpAddr, Instant>>,
}

impl Memory {
    fn new(ttl: Duration) -> Memory {
        Memory {
            ttl,
            until: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Instant>> {
        // A poisoned lock only means a task panicked mid-update; the map is still whole.
        self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.lock().get(&ip).is_some_and(|t| *t > Instant::now())
    }

    fn insert(&self, ip: IpAddr) {
        let mut until = self.lock();
        let now = Instant::now();
        if until.len() >= MAX && !until.contains_key(&ip) {
            until.retain(|_, t| *t > now);
        }
        if until.len() < MAX || until.contains_key(&ip) {
            until.insert(ip, now + self.ttl);
        }
    }

    fn remove(&self, ip: IpAddr) {
        self.lock().remove(&ip);
    }

    fn list(&self) -> Vec<(IpAddr, Duration)> {
        let until = self.lock();
        let now = Instant::now();
        let mut v: Vec<_> = until
            .iter()
            .filter(|(_, t)| **t > now)
            .map(|(ip, t)| (*ip, *t - now))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_downgrades_only_a_destination_not_heard_as_a_sidecar() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        let m = Unmeshed::new(Duration::from_secs(30), Duration::from_secs(600));
        // Never heard from: a refusal means no sidecar.
        assert!(m.refused(other));
        assert!(m.contains(other));
        // Answered once, then refused (its sidecar restarting): not a downgrade.
        m.answered(ip);
        assert!(!m.refused(ip));
        assert!(!m.contains(ip));
        // A destination that joins the mesh forgets its refusal at once.
        m.answered(other);
        assert!(!m.contains(other));
        assert!(m.list().is_empty());
    }

    #[test]
    fn an_answer_is_forgotten_after_the_sidecar_memory() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let m = Unmeshed::new(Duration::from_secs(30), Duration::ZERO);
        m.answered(ip);
        assert!(
            m.refused(ip),
            "a sidecar gone for longer than the memory is un-meshed"
        );
        assert!(m.contains(ip));
    }

    #[test]
    fn memory_is_bounded() {
        let m = Memory::new(Duration::from_secs(60));
        for i in 0..(MAX as u32 + 10) {
            m.insert(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(m.lock().len(), MAX);
    }
}
