//! Sockets: the kernel-facing edges of every connection. Listener binding, upstream connects,
//! and `SO_ORIGINAL_DST`, the address a captured connection was really headed for before
//! iptables' REDIRECT rewrote it. Linux-only; everything here is safe wrappers (nix, socket2).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The source address the inbound side uses to reach the application. The capture rules let
/// traffic from it through untouched; anything else the proxy user sends to the pod's own IP
/// over `lo` is sent back to the inbound listener (Istio uses the same address).
pub const INBOUND_PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
pub const INBOUND_PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Binds a listener. `[::]` is bound dual-stack so one listener serves IPv4 and IPv6; where
/// the pod has no IPv6 it falls back to `0.0.0.0`.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    match bind(addr) {
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            tracing::warn!(%addr, error = %e, "no IPv6 here, listening on IPv4 only");
            bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()))
        }
        other => other,
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Where a redirected connection was going (canonical: no v4-mapped form); `None` for a
/// connection nobody redirected (a client dialling the proxy port directly), whose original
/// destination is the listener's own address. The one `getsockname` answers both the address
/// family and that check: a syscall fewer per connection (issue 26, churn).
pub fn original_dst(stream: &TcpStream) -> io::Result<Option<SocketAddr>> {
    let local = stream.local_addr()?;
    let dst = canonical(kernel_original_dst(stream, local)?);
    Ok((dst != canonical(local)).then_some(dst))
}

fn kernel_original_dst(stream: &TcpStream, local: SocketAddr) -> io::Result<SocketAddr> {
    // An IPv4 connection accepted on a dual-stack socket shows v4-mapped addresses, but
    // conntrack knows it as IPv4, so the IPv4 option is the one to ask.
    let is_v4 = match local.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(ip) => ip.to_ipv4_mapped().is_some(),
    };
    if is_v4 {
        let sin = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        Ok(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).into())
    } else {
        let sin6 = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        Ok(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), 0, 0).into())
    }
}

/// The address with any v4-mapped IPv6 form turned back into IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Connects to `dst`, optionally from a chosen source IP, within `timeout`.
pub async fn connect(
    dst: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        // Without this, bind(ip:0) picks the source port before the destination is known, so
        // it must be unique across every destination: under churn the kernel scans the whole
        // ephemeral range past TIME_WAIT sockets on each bind (3.7 ms of system CPU per
        // connection, issue 15). With it, the port is chosen at connect() per destination.
        setsockopt(&socket, sockopt::IpBindAddressNoPort, &true).map_err(io::Error::from)?;
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Raises the soft file-descriptor limit to the hard limit, so one sidecar can hold tens of
/// thousands of connections (two descriptors each) instead of the usual 1,024. Returns the
/// limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard.max(soft))
}

/// The source IP the inbound side uses to reach the application at `app`.
pub fn inbound_passthrough_source(app: SocketAddr) -> IpAddr {
    match app {
        SocketAddr::V4(_) => INBOUND_PASSTHROUGH_V4.into(),
        SocketAddr::V6(_) => INBOUND_PASSTHROUGH_V6.into(),
    }
}

/// The addresses of this pod's own interfaces, for telling whether a captured inbound
/// connection was really addressed to the pod. Read from the kernel at start and again when an
/// address is not found (at most once a second, so a stream of forged destinations cannot
/// turn into a stream of netlink dumps); an address added later is picked up on first use.
pub struct LocalAddrs {
    known: std::sync::RwLock<(std::collections::HashSet<IpAddr>, std::time::Instant)>,
}

/// How often a miss may re-read the interface addresses.
const LOCAL_ADDRS_REFRESH: Duration = Duration::from_secs(1);

impl LocalAddrs {
    pub fn new() -> LocalAddrs {
        LocalAddrs {
            known: std::sync::RwLock::new((
                crate::state::interface_addrs(),
                std::time::Instant::now(),
            )),
        }
    }

    /// Whether `ip` may be an inbound connection's destination: one of the pod's own
    /// addresses, and not a loopback one. Traffic to 127.0.0.0/8 or ::1 never legitimately
    /// arrives from outside the pod; forwarding it would expose apps bound only to localhost.
    pub fn is_pod_address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            return false;
        }
        let stale = {
            let known = self.known.read().unwrap_or_else(|e| e.into_inner());
            if known.0.contains(&ip) {
                return true;
            }
            known.1.elapsed() >= LOCAL_ADDRS_REFRESH
        };
        if !stale {
            return false;
        }
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if known.1.elapsed() >= LOCAL_ADDRS_REFRESH {
            *known = (crate::state::interface_addrs(), std::time::Instant::now());
        }
        known.0.contains(&ip)
    }
}

impl Default for LocalAddrs {
    fn default() -> Self {
        LocalAddrs::new()
    }
}

/// Accept failures (running out of descriptors, mostly) said once, then summed up every
/// `ACCEPT_ERROR_SUMMARY` while they go on: at 10 retries a second the log would otherwise be
/// the first thing to fill up.
#[derive(Default)]
pub struct AcceptErrors {
    /// When the last line was logged, and how many failures since.
    last: Option<(std::time::Instant, u64)>,
}

const ACCEPT_ERROR_SUMMARY: Duration = Duration::from_secs(10);

impl AcceptErrors {
    pub fn record(&mut self, listener: &str, e: &std::io::Error) {
        match &mut self.last {
            Some((at, since)) if at.elapsed() < ACCEPT_ERROR_SUMMARY => *since += 1,
            Some((at, since)) => {
                tracing::error!(listener, error = %e, failures = *since + 1, period = ?ACCEPT_ERROR_SUMMARY, "accept still failing; backing off");
                *at = std::time::Instant::now();
                *since = 0;
            }
            None => {
                tracing::error!(listener, error = %e, "accept failed; backing off");
                self.last = Some((std::time::Instant::now(), 0));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_foreign_destinations_are_not_pod_addresses() {
        let local = LocalAddrs::new();
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!local.is_pod_address(ip.parse().unwrap()), "{ip}");
        }
        // TEST-NET-3: on no interface here.
        assert!(!local.is_pod_address("203.0.113.9".parse().unwrap()));
        // Some non-loopback address of this machine is one.
        let own = crate::state::interface_addrs().into_iter().find(|ip| {
            !ip.is_loopback() && !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] == 0xfe80)
        });
        if let Some(ip) = own {
            assert!(local.is_pod_address(ip), "{ip}");
        }
    }
}
