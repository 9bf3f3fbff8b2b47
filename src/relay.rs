//! Relay: the last stage of every connection. Copies bytes both ways until both sides are
//! done, passing a half-close (FIN, or TLS close_notify) through in each direction, so a client
//! that shuts its write side still receives the server's whole answer.

use std::future::Future;
use std::io;
use std::task::{Context, Poll};

use bytes::BytesMut;
use prometheus::IntCounter;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::ConnectionRecorder;

/// Per-direction buffer: on the heap, held only while a read is in progress or has data (an
/// idle connection, waiting for bytes, holds none), starting small and doubling while reads
/// fill it, so the thousands of idle connections a sidecar holds cost little while a bulk
/// transfer still moves up to 64 KiB per read and write.
const MIN_BUF: usize = 1024;
const MAX_BUF: usize = 64 * 1024;

/// Bytes moved, by direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the side that opened the connection to the side it reached.
    pub client_to_upstream: u64,
    /// From the upstream back to the client.
    pub upstream_to_client: u64,
}

/// Which side broke the relay.
#[derive(Debug, Error)]
pub enum RelayError {
    #[error("client side: {0}")]
    Client(io::Error),
    #[error("upstream side: {0}")]
    Upstream(io::Error),
}

/// Copies `client` ⇄ `upstream` until both directions have ended, adding to `meter`'s byte
/// counters as bytes move. On an error in either direction the other is abandoned (both
/// sockets are closed when the streams drop) and the error says which side failed.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    meter: &ConnectionRecorder,
) -> (Transferred, Option<RelayError>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut upstream_rd, mut upstream_wr) = tokio::io::split(upstream);
    let mut sent = Transferred::default();
    let (mut up_count, mut down_count) = (0u64, 0u64);
    let result = {
        let up = copy_one_way(
            &mut client_rd,
            &mut upstream_wr,
            &mut up_count,
            &meter.received,
            Side::Client,
        );
        let down = copy_one_way(
            &mut upstream_rd,
            &mut client_wr,
            &mut down_count,
            &meter.sent,
            Side::Upstream,
        );
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => { up_done = true; if let Err(e) = r { break Some(e); } }
                r = &mut down, if !down_done => { down_done = true; if let Err(e) = r { break Some(e); } }
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    sent.client_to_upstream = up_count;
    sent.upstream_to_client = down_count;
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
    count: &mut u64,
    meter: &IntCounter,
    from_side: Side,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    let mut size = MIN_BUF;
    loop {
        let n = std::future::poll_fn(|cx| read_or_release(from, cx, &mut buf, size))
            .await
            .map_err(|e| from_side.error(e))?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n])
            .await
            .map_err(|e| from_side.other().error(e))?;
        *count += n as u64;
        meter.inc_by(n as u64);
        if n >= size && size < MAX_BUF {
            size *= 2;
        }
    }
    to.shutdown().await.map_err(|e| from_side.other().error(e))
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

    #[tokio::test]
    async fn bytes_arrive_intact_and_half_close_passes_through() {
        let (client, mut app_client) = tokio::io::duplex(1024);
        let (upstream, mut app_server) = tokio::io::duplex(1024);
        let meter = ConnectionRecorder::detached();
        let relay = tokio::spawn(async move {
            let result = relay(client, upstream, &meter).await;
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
        let (_, err) = relay(client, Broken, &meter).await;
        assert!(matches!(err, Some(RelayError::Upstream(_))), "{err:?}");

        let (upstream, _keep) = tokio::io::duplex(64);
        let (_, err) = relay(Broken, upstream, &meter).await;
        assert!(matches!(err, Some(RelayError::Client(_))), "{err:?}");
    }
}
