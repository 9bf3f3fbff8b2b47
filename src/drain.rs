//! Drain: how the sidecar stops without cutting connections. On SIGTERM or `POST /drain`:
//! readiness turns false at once, the listeners keep accepting for the accept period (while
//! Kubernetes removes the endpoint) and then stop, connections in flight get until the
//! deadline to finish, then the process exits. Every proxied connection holds a [`Watcher`]; a
//! second signal exits at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Starts the drain and waits for it; owned by the app.
#[derive(Clone)]
pub struct Drain {
    draining: watch::Sender<bool>,
    /// False once the accept period is over.
    accepting: watch::Sender<bool>,
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

/// Held by each connection; dropping it tells the drain one fewer is in flight.
pub struct Watcher {
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain {
            draining: watch::channel(false).0,
            accepting: watch::channel(true).0,
            active: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
        }
    }

    /// Registers one connection in flight.
    pub fn watcher(&self) -> Watcher {
        self.active.fetch_add(1, Ordering::AcqRel);
        Watcher {
            active: self.active.clone(),
            idle: self.idle.clone(),
        }
    }

    /// Connections in flight now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves once draining has started (listeners select on it to stop accepting).
    pub async fn started(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Resolves once the listeners are to stop accepting (after the accept period).
    pub async fn accepting_stopped(&self) {
        let mut rx = self.accepting.subscribe();
        let _ = rx.wait_for(|a| !*a).await;
    }

    /// Ends the accept period: the listeners stop accepting (idempotent).
    pub fn stop_accepting(&self) {
        self.accepting.send_replace(false);
    }

    /// Starts draining (idempotent).
    pub fn start(&self) {
        self.draining.send_replace(true);
    }

    /// Waits until no connection is in flight or `deadline` passes; returns how many were
    /// still open (and will be cut when the process exits).
    pub async fn finish(&self, deadline: Duration) -> usize {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.active()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_connections_then_reports_what_is_left() {
        let drain = Drain::new();
        let w1 = drain.watcher();
        let w2 = drain.watcher();
        assert!(!drain.is_draining());
        drain.start();
        drain.started().await;
        let d = drain.clone();
        let finished = tokio::spawn(async move { d.finish(Duration::from_secs(30)).await });
        drop(w1);
        tokio::task::yield_now().await;
        drop(w2);
        assert_eq!(finished.await.unwrap(), 0);

        let _stuck = drain.watcher();
        assert_eq!(drain.finish(Duration::from_millis(20)).await, 1);
    }
}
