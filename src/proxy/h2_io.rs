//! Tunnel streams as byte streams: one HTTP/2 CONNECT stream (one application connection in
//! the tunnel) read and written like a TCP connection, so [`relay`](super::relay) serves it
//! as it serves a socket. END_STREAM is the half-close; RST_STREAM is the reset.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One CONNECT stream, either side of the tunnel.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Data received and not yet read by the relay.
    unread: Bytes,
    /// Set by `abort_on_close`: dropping the stream then resets it instead of leaving it
    /// half-open.
    abort: AtomicBool,
    /// Held for as long as the stream is open (the pool counts a connection's streams by it).
    _open: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream {
            send,
            recv,
            unread: Bytes::new(),
            abort: AtomicBool::new(false),
            _open: None,
        }
    }

    /// Keeps `guard` until this stream is dropped.
    pub fn holding(mut self, guard: impl Send + Sync + 'static) -> H2Stream {
        self._open = Some(Box::new(guard));
        self
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if self.abort.load(Ordering::Relaxed) {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

impl super::relay::Abortable for H2Stream {
    fn abort_on_close(&self) {
        self.abort.store(true, Ordering::Relaxed);
    }
}

/// A reset or a broken tunnel reads as a reset connection: the relay then resets the other
/// side too, as it does for TCP.
fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    // The window opens again as soon as a chunk is taken: at most one chunk
                    // waits here per stream, and the sender keeps a full window in flight.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.unread = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
        let n = buf.remaining().min(this.unread.len());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(buf.len());
        loop {
            match ready!(send.poll_capacity(cx)) {
                // Capacity freed for another stream can wake this one with none left.
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => return Poll::Ready(Err(stream_gone(send, cx))),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes out what it has on its own; there is nothing to wait for per stream.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let send = &mut self.send;
        match send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(stream_gone(send, cx))),
        }
    }
}

/// Why a stream can take no more data: the peer's reset, if it sent one.
fn stream_gone(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> io::Error {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset by the peer ({reason})"),
        ),
        Poll::Ready(Err(e)) => to_io(e),
        Poll::Pending => io::ErrorKind::BrokenPipe.into(),
    }
}
