//! Live state, learned in band: destinations whose tunnel port refused (no sidecar there), as
//! `proxy::outbound`'s `auto` found them. Remembered for a while so that later connections
//! skip the probe; forgotten after it, so a destination that joins the mesh is tunnelled to.

use std::net::IpAddr;

/// Destinations whose tunnel port refused (no sidecar there), remembered for
/// `outbound.unmeshed_ttl` so `auto` does not probe them on every connection. Bounded: past
/// `UNMESHED_MAX` entries, expired ones are dropped, and if none has expired the new one is
/// not remembered (it is probed again next time, which costs a round trip, not safety).
pub struct Unmeshed {
    ttl: std::time::Duration,
    until: std::sync::Mutex<std::collections::HashMap<IpAddr, std::time::Instant>>,
}

const UNMESHED_MAX: usize = 16 * 1024;

impl Unmeshed {
    pub fn new(ttl: std::time::Duration) -> Unmeshed {
        Unmeshed {
            ttl,
            until: Default::default(),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        until
            .get(&ip)
            .is_some_and(|t| *t > std::time::Instant::now())
    }

    pub fn insert(&self, ip: IpAddr) {
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if until.len() >= UNMESHED_MAX {
            until.retain(|_, t| *t > now);
        }
        if until.len() < UNMESHED_MAX {
            until.insert(ip, now + self.ttl);
        }
    }

    /// The destinations remembered now, with how long each has left.
    pub fn list(&self) -> Vec<(IpAddr, std::time::Duration)> {
        let until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let mut v: Vec<_> = until
            .iter()
            .filter(|(_, t)| **t > now)
            .map(|(ip, t)| (*ip, *t - now))
            .collect();
        v.sort();
        v
    }
}
