//! Relay: the last stage of every connection. Copies bytes both ways until both sides are
//! done, passing a half-close (FIN, or TLS close_notify) through in each direction, so a client
//! that shuts its write side still receives the server's whole answer.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use prometheus::IntCounter;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadHalf, WriteHalf};

use crate::metrics::ConnectionRecorder;

/// Per-direction buffer: on the heap, held only while a read is in progress or has data (an
/// idle connection, waiting for bytes, holds none), starting small and doubling while reads
/// fill it, so the thousands of idle connections a sidecar holds cost little while a bulk
/// transfer moves up to 256 KiB per read and write (fewer reads, writes, HTTP/2 frames and
/// task wake-ups per byte than 64 KiB: proxy CPU per GB 2.61-3.08 -> 2.15-2.52 s through the
/// tunnel, benches/RESULTS.md, issue 26).
const MIN_BUF: usize = 1024;
const MAX_BUF: usize = 256 * 1024;

/// Bytes moved, by direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the side that opened the connection to the side it reached.
    pub client_to_upstream: u64,
    /// From the upstream back to the client.
    pub upstream_to_client: u64,
}

impl std::ops::Add for Transferred {
    type Output = Transferred;
    fn add(self, other: Transferred) -> Transferred {
        Transferred {
            client_to_upstream: self.client_to_upstream + other.client_to_upstream,
            upstream_to_client: self.upstream_to_client + other.upstream_to_client,
        }
    }
}

/// Which side broke the relay.
#[derive(Debug, Error)]
pub enum RelayError {
    #[error("client side: {0}")]
    Client(io::Error),
    #[error("upstream side: {0}")]
    Upstream(io::Error),
    #[error("idle for {0:?}: closed")]
    Idle(Duration),
}

/// A stream whose connection can be closed abortively. When a relay ends because one side
/// failed (it reset the connection, or a peer sidecar died without TLS close_notify), the
/// other side is closed with a reset as well, as Envoy does: its client then sees an error,
/// not a clean end of stream it would take for a complete answer (issue 13).
pub trait Abortable {
    /// From now on, closing sends RST instead of FIN.
    fn abort_on_close(&self);
}

impl Abortable for tokio::net::TcpStream {
    fn abort_on_close(&self) {
        // SO_LINGER 0: close() discards unsent data and sends RST, without blocking (tokio
        // deprecates set_linger for the non-zero case, which blocks in close).
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

impl<T: Abortable + ?Sized> Abortable for Box<T> {
    fn abort_on_close(&self) {
        (**self).abort_on_close()
    }
}

impl<S: Abortable> Abortable for tokio_rustls::server::TlsStream<S> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close()
    }
}

impl<S: Abortable> Abortable for tokio_rustls::client::TlsStream<S> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close()
    }
}

/// In-memory pipes (tests, benches) have nothing to reset.
impl Abortable for tokio::io::DuplexStream {
    fn abort_on_close(&self) {}
}

/// How the relay takes a connection apart: a half it reads owned chunks from and a half it
/// writes owned chunks to. A socket (or a TLS stream) is read into the relay's own buffer
/// and written from it; a tunnel stream hands over the chunks HTTP/2 received and takes the
/// chunks it sends as they are, so bytes between a socket and a tunnel stream are copied by
/// neither (issue 26: a `memmove` per write and per read was 8% of the tunnel's profile).
pub trait Duplex: Abortable + Sized {
    type Reader: ReadChunks;
    type Writer: WriteChunks;
    fn split(self) -> (Self::Reader, Self::Writer);
    /// The halves back together, to close the connection abortively.
    fn unsplit(reader: Self::Reader, writer: Self::Writer) -> Self;
}

/// The read half of a [`Duplex`].
pub trait ReadChunks: Unpin {
    /// The next bytes, about `size` at most; empty at the end of the stream. `buf` is the
    /// relay's buffer for this direction, for halves that read into one: released (left
    /// empty, unallocated) while nothing can be read, so an idle connection holds none.
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        size: usize,
    ) -> Poll<io::Result<Bytes>>;
}

/// The write half of a [`Duplex`].
pub trait WriteChunks: Unpin {
    /// Writes all of `chunk`, taking bytes off its front as they are accepted.
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes)
        -> Poll<io::Result<()>>;
    /// Ends this direction: FIN, close_notify + FIN, or END_STREAM.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl<T: AsyncRead> ReadChunks for ReadHalf<T> {
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        size: usize,
    ) -> Poll<io::Result<Bytes>> {
        let n = std::task::ready!(read_or_release(self, cx, buf, size))?;
        // Once the chunk is written and dropped, `buf` owns its allocation alone again and
        // the next read reuses it.
        Poll::Ready(Ok(buf.split_to(n).freeze()))
    }
}

impl<T: AsyncWrite> WriteChunks for WriteHalf<T> {
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        while !chunk.is_empty() {
            let n = std::task::ready!(std::pin::Pin::new(&mut *self).poll_write(cx, chunk))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            chunk.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::pin::Pin::new(self).poll_shutdown(cx)
    }
}

/// Streams the relay splits with tokio's `split` (both halves share the stream behind a
/// lock; a TLS stream cannot be split otherwise). `sniff::Rewind` does the same in its own
/// module (modules depend on each other one way only).
macro_rules! split_by_tokio {
    ($({$($generics:tt)*} $t:ty),* $(,)?) => {$(
        impl<$($generics)*> Duplex for $t {
            type Reader = ReadHalf<Self>;
            type Writer = WriteHalf<Self>;
            fn split(self) -> (Self::Reader, Self::Writer) {
                tokio::io::split(self)
            }
            fn unsplit(reader: Self::Reader, writer: Self::Writer) -> Self {
                reader.unsplit(writer)
            }
        }
    )*};
}

split_by_tokio! {
    {} tokio::net::TcpStream,
    {} tokio::io::DuplexStream,
    {S: AsyncRead + AsyncWrite + Abortable + Unpin} tokio_rustls::server::TlsStream<S>,
    {S: AsyncRead + AsyncWrite + Abortable + Unpin} tokio_rustls::client::TlsStream<S>,
    // A TLS stream is boxed where it is made (its state is large, and moves would copy it).
    {S: AsyncRead + AsyncWrite + Abortable + Unpin} Box<S>,
}

/// Copies `client` ⇄ `upstream` until both directions have ended, adding to `meter`'s byte
/// counters as bytes move. On an error in either direction the other is abandoned and both
/// connections are closed with a reset (see `Abortable`); the error says which side failed.
/// With `idle` set, a connection that moves no byte either way for that long is closed.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    meter: &ConnectionRecorder,
    idle: Option<Duration>,
) -> (Transferred, Option<RelayError>)
where
    C: Duplex,
    U: Duplex,
{
    let (mut client_rd, mut client_wr) = client.split();
    let (mut upstream_rd, mut upstream_wr) = upstream.split();
    // Atomics only so the future stays Send: both directions run in this one task.
    let (up_count, down_count) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = {
        let up = copy_one_way(
            &mut client_rd,
            &mut upstream_wr,
            &up_count,
            &meter.received,
            Side::Client,
        );
        let down = copy_one_way(
            &mut upstream_rd,
            &mut client_wr,
            &down_count,
            &meter.sent,
            Side::Upstream,
        );
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        // The idle check compares this connection's byte counts between wake-ups: the copy
        // loops pay nothing for it.
        let moved = || (up_count.load(Relaxed), down_count.load(Relaxed));
        let mut last = moved();
        let idle_check = tokio::time::sleep(idle.unwrap_or(Duration::MAX / 4));
        tokio::pin!(idle_check);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => { up_done = true; if let Err(e) = r { break Some(e); } }
                r = &mut down, if !down_done => { down_done = true; if let Err(e) = r { break Some(e); } }
                _ = &mut idle_check, if idle.is_some() => {
                    let now = moved();
                    let limit = idle.unwrap_or_default();
                    if now == last {
                        break Some(RelayError::Idle(limit));
                    }
                    last = now;
                    idle_check.as_mut().reset(tokio::time::Instant::now() + limit);
                }
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    if result.is_some() {
        C::unsplit(client_rd, client_wr).abort_on_close();
        U::unsplit(upstream_rd, upstream_wr).abort_on_close();
    }
    let sent = Transferred {
        client_to_upstream: up_count.into_inner(),
        upstream_to_client: down_count.into_inner(),
    };
    (sent, result)
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn error(self, e: io::Error) -> RelayError {
        match self {
            Side::Client => RelayError::Client(e),
            Side::Upstream => RelayError::Upstream(e),
        }
    }
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// Copies until `from` ends, then shuts `to`'s write side (FIN or close_notify + FIN).
async fn copy_one_way<R, W>(
    from: &mut R,
    to: &mut W,
    count: &AtomicU64,
    meter: &IntCounter,
    from_side: Side,
) -> Result<(), RelayError>
where
    R: ReadChunks,
    W: WriteChunks,
{
    let mut buf = BytesMut::new();
    let mut size = MIN_BUF;
    loop {
        let mut chunk = std::future::poll_fn(|cx| from.poll_chunk(cx, &mut buf, size))
            .await
            .map_err(|e| from_side.error(e))?;
        let n = chunk.len();
        if n == 0 {
            break;
        }
        std::future::poll_fn(|cx| to.poll_write_chunk(cx, &mut chunk))
            .await
            .map_err(|e| from_side.other().error(e))?;
        count.fetch_add(n as u64, Relaxed);
        meter.inc_by(n as u64);
        if n >= size && size < MAX_BUF {
            size *= 2;
        }
    }
    std::future::poll_fn(|cx| to.poll_shutdown(cx))
        .await
        .map_err(|e| from_side.other().error(e))
}

/// One read into `buf` (reserving `size` bytes, uninitialised, if it was released); if
/// nothing can be read yet, releases `buf` so the connection holds no buffer while it waits.
fn read_or_release<R: AsyncRead + Unpin>(
    from: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    size: usize,
) -> Poll<io::Result<usize>> {
    buf.clear();
    buf.reserve(size);
    // tokio's read_buf fills spare capacity without zeroing it first (a fresh 64 KiB memset
    // per read would cost more than the read); the future holds no state between polls.
    let polled = std::pin::pin!(from.read_buf(buf)).poll(cx);
    if polled.is_pending() {
        *buf = BytesMut::new();
    }
    polled
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn bytes_arrive_intact_and_half_close_passes_through() {
        let (client, mut app_client) = tokio::io::duplex(1024);
        let (upstream, mut app_server) = tokio::io::duplex(1024);
        let meter = ConnectionRecorder::detached();
        let relay = tokio::spawn(async move {
            let result = relay(client, upstream, &meter, None).await;
            (result, meter.received.get(), meter.sent.get())
        });

        let request: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let req = request.clone();
        let writer = tokio::spawn(async move {
            app_client.write_all(&req).await.unwrap();
            // Half-close: the client is done sending but still reads the answer.
            app_client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            app_client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut got = Vec::new();
        app_server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, request);
        app_server.write_all(b"the whole answer").await.unwrap();
        app_server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"the whole answer");

        let ((sent, err), received_metric, sent_metric) = relay.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!(sent.client_to_upstream, 100_000);
        assert_eq!(sent.upstream_to_client, 16);
        assert_eq!((received_metric, sent_metric), (100_000, 16));
    }

    struct Broken;
    impl AsyncRead for Broken {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }
    impl Abortable for Broken {
        fn abort_on_close(&self) {}
    }
    split_by_tokio! { {} Broken }
    impl AsyncWrite for Broken {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn errors_name_the_side_that_failed() {
        // The upstream resets while the client is idle: the relay ends, blaming upstream,
        // instead of waiting on the client forever.
        let (client, _keep) = tokio::io::duplex(64);
        let meter = ConnectionRecorder::detached();
        let (_, err) = relay(client, Broken, &meter, None).await;
        assert!(matches!(err, Some(RelayError::Upstream(_))), "{err:?}");

        let (upstream, _keep) = tokio::io::duplex(64);
        let (_, err) = relay(Broken, upstream, &meter, None).await;
        assert!(matches!(err, Some(RelayError::Client(_))), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
        let (client, mut app_client) = tokio::io::duplex(64);
        let (upstream, mut app_server) = tokio::io::duplex(64);
        let meter = ConnectionRecorder::detached();
        let idle = Some(Duration::from_secs(10));
        let relay = tokio::spawn(async move { relay(client, upstream, &meter, idle).await });
        // Busy: a byte every 6 s for a minute keeps it open.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            app_client.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            app_server.read_exact(&mut b).await.unwrap();
        }
        assert!(!relay.is_finished(), "closed while busy");
        // Quiet: closed within two idle periods.
        tokio::time::sleep(Duration::from_secs(21)).await;
        let (sent, err) = relay.await.unwrap();
        assert!(matches!(err, Some(RelayError::Idle(_))), "{err:?}");
        assert_eq!(sent.client_to_upstream, 10);
    }
}
