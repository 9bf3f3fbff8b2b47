//! Under each mTLS stream, between the socket and rustls: batches socket reads.
//!
//! rustls asks its transport for at most about 4 KiB at a time (rustls 0.23 grows its record
//! buffer 4 KiB per read), so reading a 16 KiB record straight from a socket costs four or
//! five `read` syscalls. This wrapper reads up to 64 KiB per syscall and serves rustls from
//! memory. The buffer exists only while bytes are flowing: when the socket has nothing more
//! to give, it is freed, so an idle connection holds none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::future::Future;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The most one socket read takes.
const CHUNK: usize = 64 * 1024;

/// A stream whose reads are batched; writes pass straight through.
pub struct Batched<S> {
    inner: S,
    /// Read from the socket, not yet handed on.
    buf: BytesMut,
}

impl<S> Batched<S> {
    pub fn new(inner: S) -> Self {
        Batched {
            inner,
            buf: BytesMut::new(),
        }
    }
}

impl<S: crate::proxy::relay::Abortable> crate::proxy::relay::Abortable for Batched<S> {
    fn abort_on_close(&self) {
        self.inner.abort_on_close()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Batched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= CHUNK {
                // A caller with room for a whole chunk gets it directly: no copy.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.reserve(CHUNK);
            // read_buf fills the spare capacity without zeroing it first.
            match std::pin::pin!(this.inner.read_buf(&mut this.buf)).poll(cx) {
                Poll::Ready(Ok(_)) => {}
                other => {
                    // Nothing to read now (or an error): give the memory back until there is.
                    this.buf = BytesMut::new();
                    return other.map_ok(|_| ());
                }
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Batched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_idle_holds_no_buffer() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let mut s = Batched::new(near);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        while got.len() < data.len() {
            let n = s.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        // Nothing left to read: the next read waits, and the chunk is freed meanwhile.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(20), s.read(&mut small));
        assert!(waiting.await.is_err());
        assert_eq!(s.buf.capacity(), 0);
        // Writes pass through; end of stream reads as 0.
        s.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        far.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
        drop(far);
        assert_eq!(s.read(&mut small).await.unwrap(), 0);
    }
}
