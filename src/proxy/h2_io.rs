//! Tunnel streams as byte streams: one HTTP/2 CONNECT stream (one application connection in
//! the tunnel) read and written like a TCP connection, so [`relay`](super::relay) serves it
//! as it serves a socket. END_STREAM is the half-close; RST_STREAM is the reset. The relay
//! takes the stream apart into its receive and send halves and moves HTTP/2's own chunks
//! through them without copying; `AsyncRead`/`AsyncWrite` (which copy) are for the
//! in-process stats endpoints.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::relay::{Abortable, Duplex, ReadChunks, WriteChunks};

/// One CONNECT stream, either side of the tunnel.
pub struct H2Stream {
    recv: H2Recv,
    send: H2Send,
}

/// What the peer sends on a stream.
pub struct H2Recv {
    recv: RecvStream,
    /// Data received and not yet read (by `AsyncRead`, which may take less than a chunk).
    unread: Bytes,
}

/// What this side sends on a stream.
pub struct H2Send {
    send: SendStream<Bytes>,
    /// Set by `abort_on_close`: dropping the stream then resets it instead of leaving it
    /// half-open.
    abort: AtomicBool,
    /// Held for as long as the stream is open (the pool counts a connection's streams by it).
    _open: Option<Box<dyn Send + Sync>>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream {
            recv: H2Recv {
                recv,
                unread: Bytes::new(),
            },
            send: H2Send {
                send,
                abort: AtomicBool::new(false),
                _open: None,
            },
        }
    }

    /// Keeps `guard` until this stream is dropped.
    pub fn holding(mut self, guard: impl Send + Sync + 'static) -> H2Stream {
        self.send._open = Some(Box::new(guard));
        self
    }
}

impl Drop for H2Send {
    fn drop(&mut self) {
        if self.abort.load(Ordering::Relaxed) {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

impl Abortable for H2Stream {
    fn abort_on_close(&self) {
        self.send.abort.store(true, Ordering::Relaxed);
    }
}

impl Duplex for H2Stream {
    type Reader = H2Recv;
    type Writer = H2Send;
    fn split(self) -> (H2Recv, H2Send) {
        (self.recv, self.send)
    }
    fn unsplit(recv: H2Recv, send: H2Send) -> H2Stream {
        H2Stream { recv, send }
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

impl H2Recv {
    /// The next chunk HTTP/2 received (at most a frame), empty at END_STREAM.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if !self.unread.is_empty() {
            return Poll::Ready(Ok(std::mem::take(&mut self.unread)));
        }
        match ready!(self.recv.poll_data(cx)) {
            None => Poll::Ready(Ok(Bytes::new())),
            Some(Ok(data)) => {
                // The window opens again as soon as a chunk is taken: at most one chunk
                // waits here per stream, and the sender keeps a full window in flight.
                let _ = self.recv.flow_control().release_capacity(data.len());
                Poll::Ready(Ok(data))
            }
            Some(Err(e)) => Poll::Ready(Err(to_io(e))),
        }
    }
}

impl ReadChunks for H2Recv {
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buf: &mut BytesMut,
        _size: usize,
    ) -> Poll<io::Result<Bytes>> {
        // HTTP/2's own buffer, handed on as it is.
        self.poll_next(cx)
    }
}

impl H2Send {
    /// Sends as much of `chunk` as the stream's window allows now, taking it off the front.
    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        let send = &mut self.send;
        send.reserve_capacity(chunk.len());
        loop {
            match ready!(send.poll_capacity(cx)) {
                // Capacity freed for another stream can wake this one with none left.
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let part = chunk.split_to(n.min(chunk.len()));
                    send.send_data(part, false).map_err(to_io)?;
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => return Poll::Ready(Err(stream_gone(send, cx))),
            }
        }
    }
}

impl WriteChunks for H2Send {
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        while !chunk.is_empty() {
            ready!(self.poll_send(cx, chunk))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let send = &mut self.send;
        match send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(stream_gone(send, cx))),
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let recv = &mut self.recv;
        if recv.unread.is_empty() {
            recv.unread = ready!(recv.poll_next(cx))?;
        }
        let n = buf.remaining().min(recv.unread.len());
        buf.put_slice(&recv.unread[..n]);
        recv.unread.advance(n);
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
        let mut chunk = Bytes::copy_from_slice(buf);
        ready!(self.send.poll_send(cx, &mut chunk))?;
        Poll::Ready(Ok(buf.len() - chunk.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes out what it has on its own; there is nothing to wait for per stream.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        WriteChunks::poll_shutdown(&mut self.send, cx)
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
