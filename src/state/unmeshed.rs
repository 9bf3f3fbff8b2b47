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

/// Addresses remembered at most. Past it, expired ones are dropped, and if none has expired
/// the new one is not remembered: a forgotten refusal costs a probe, a forgotten answer leaves
/// the next refusal to decide as if nothing were known.
const MAX: usize = 16 * 1024;

/// What was last heard from an address's tunnel port.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Heard {
    /// Refused: reached in plaintext without asking again until then.
    Refused,
    /// Answered as a sidecar: a refusal until then fails closed instead of downgrading.
    Answered,
}

/// What `auto` learned about destinations' tunnel ports: one map, so that a stream opened
/// (`answered`, on every tunnel stream) costs one lock.
pub struct Unmeshed {
    /// How long a refusal is remembered (`outbound.unmeshed_ttl`).
    ttl: Duration,
    /// How long an answer is (`outbound.sidecar_memory`).
    sidecar_memory: Duration,
    heard: Mutex<HashMap<IpAddr, (Heard, Instant)>>,
}

impl Unmeshed {
    pub fn new(ttl: Duration, sidecar_memory: Duration) -> Unmeshed {
        Unmeshed {
            ttl,
            sidecar_memory,
            heard: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (Heard, Instant)>> {
        // A poisoned lock only means a task panicked mid-update; the map is still whole.
        self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What is remembered of `ip` now (nothing once it has expired).
    fn now_of(heard: &HashMap<IpAddr, (Heard, Instant)>, ip: IpAddr) -> Option<Heard> {
        heard
            .get(&ip)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(h, _)| *h)
    }

    /// Whether `ip` refused recently: no sidecar there.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::now_of(&self.lock(), ip) == Some(Heard::Refused)
    }

    /// `ip`'s tunnel port refused. Returns `false`, and remembers nothing, when `ip` answered
    /// as a sidecar within `sidecar_memory`: that refusal is a sidecar restarting, and the
    /// connection must fail rather than go out in plaintext.
    pub fn refused(&self, ip: IpAddr) -> bool {
        let mut heard = self.lock();
        if Self::now_of(&heard, ip) == Some(Heard::Answered) {
            return false;
        }
        remember(&mut heard, ip, Heard::Refused, self.ttl);
        true
    }

    /// `ip`'s tunnel port answered (a stream opened): a sidecar is there, and any refusal
    /// remembered of it is forgotten.
    pub fn answered(&self, ip: IpAddr) {
        remember(&mut self.lock(), ip, Heard::Answered, self.sidecar_memory);
    }

    /// The destinations remembered as un-meshed now, with how long each has left.
    pub fn list(&self) -> Vec<(IpAddr, Duration)> {
        let heard = self.lock();
        let now = Instant::now();
        let mut v: Vec<_> = heard
            .iter()
            .filter(|(_, (h, until))| *h == Heard::Refused && *until > now)
            .map(|(ip, (_, until))| (*ip, *until - now))
            .collect();
        v.sort();
        v
    }
}

/// Remembers `what` of `ip` for `ttl`, within the bound.
fn remember(heard: &mut HashMap<IpAddr, (Heard, Instant)>, ip: IpAddr, what: Heard, ttl: Duration) {
    let now = Instant::now();
    if heard.len() >= MAX && !heard.contains_key(&ip) {
        heard.retain(|_, (_, until)| *until > now);
    }
    if heard.len() < MAX || heard.contains_key(&ip) {
        heard.insert(ip, (what, now + ttl));
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
        let m = Unmeshed::new(Duration::from_secs(60), Duration::from_secs(60));
        for i in 0..(MAX as u32 + 10) {
            m.refused(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(m.lock().len(), MAX);
    }
}
