//! Detection: the inbound step between accepting a connection and deciding what it is. Reads
//! the first bytes (bounded in size and time) and classifies them as mesh mTLS (a TLS
//! ClientHello offering the mesh ALPN), foreign TLS, plaintext, or nothing at all. The bytes are
//! never lost: they are handed back in front of the stream ([`Rewind`]), so whoever comes next
//! (the TLS acceptor, or the relay to the app) sees the stream from its first byte.
//!
//! Reading and replaying (as Linkerd does) rather than `MSG_PEEK`: a peek cannot wait for
//! *more* bytes without spinning, because the socket stays readable while unread data sits in
//! it. A ClientHello can span several TCP segments (post-quantum key shares make it > 1 KiB),
//! so waiting for more is the common case.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What the first bytes of a connection turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS ClientHello offering the mesh ALPN.
    MeshTls,
    /// TLS, but not ours: a client doing its own TLS (or a hello too large or malformed to be
    /// one of ours).
    ForeignTls,
    /// Anything that is not a TLS handshake record.
    Plaintext,
    /// Nothing (or not enough to decide) arrived before the detect timeout: a server-first
    /// protocol, or a silent client.
    Timeout,
}

impl Protocol {
    /// The label used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::MeshTls => "mtls",
            Protocol::ForeignTls => "foreign_tls",
            Protocol::Plaintext => "plaintext",
            Protocol::Timeout => "timeout",
        }
    }

    /// The protocol a metric label names (the inverse of [`Protocol::name`]).
    pub fn from_name(name: &str) -> Option<Protocol> {
        [
            Protocol::MeshTls,
            Protocol::ForeignTls,
            Protocol::Plaintext,
            Protocol::Timeout,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }
}

/// The verdict on a prefix of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Done(Protocol),
    /// The prefix is a plausible start of a ClientHello; read more.
    NeedMore,
}

const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_ALPN: u16 = 0x0010;
/// TLS records carry at most 2^14 bytes of plaintext (RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;

/// Classifies the first bytes of a connection. Pure, so it is table-tested on fixtures.
/// `limit` caps how much may be buffered: a hello that does not fit is not one of ours.
pub fn classify(buf: &[u8], mesh_alpn: &[u8], limit: usize) -> Verdict {
    let Some(&first) = buf.first() else {
        return Verdict::NeedMore;
    };
    // The very first byte settles plaintext, so STRICT refuses without waiting for more.
    if first != CONTENT_HANDSHAKE {
        return Verdict::Done(Protocol::Plaintext);
    }
    // Reassemble the handshake message from consecutive handshake records.
    let mut hs = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return need_more(buf, limit);
        }
        let (typ, major, len) = (
            rest[0],
            rest[1],
            u16::from_be_bytes([rest[3], rest[4]]) as usize,
        );
        if typ != CONTENT_HANDSHAKE || major != 3 || len == 0 || len > MAX_RECORD {
            // Not a TLS record layer after all (or a broken one): only the first record
            // decides TLS-vs-not; a broken later one is TLS we cannot read.
            return Verdict::Done(if hs.is_empty() {
                Protocol::Plaintext
            } else {
                Protocol::ForeignTls
            });
        }
        let have = (rest.len() - 5).min(len);
        hs.extend_from_slice(&rest[5..5 + have]);
        if hs.len() >= 4 {
            if hs[0] != HANDSHAKE_CLIENT_HELLO {
                return Verdict::Done(Protocol::ForeignTls);
            }
            let msg_len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            if msg_len + 4 > limit {
                return Verdict::Done(Protocol::ForeignTls);
            }
            if hs.len() >= msg_len + 4 {
                return Verdict::Done(match offers_alpn(&hs[4..4 + msg_len], mesh_alpn) {
                    Some(true) => Protocol::MeshTls,
                    _ => Protocol::ForeignTls,
                });
            }
        }
        if have < len {
            return need_more(buf, limit);
        }
        rest = &rest[5 + len..];
    }
}

fn need_more(buf: &[u8], limit: usize) -> Verdict {
    if buf.len() >= limit {
        Verdict::Done(Protocol::ForeignTls)
    } else {
        Verdict::NeedMore
    }
}

/// Whether a ClientHello body offers `alpn`; `None` when the body is malformed.
fn offers_alpn(body: &[u8], alpn: &[u8]) -> Option<bool> {
    let mut r = Reader(body);
    r.skip(2 + 32)?; // legacy_version, random
    let n = r.u8()? as usize;
    r.skip(n)?; // legacy_session_id
    let n = r.u16()? as usize;
    r.skip(n)?; // cipher_suites
    let n = r.u8()? as usize;
    r.skip(n)?; // legacy_compression_methods
    if r.0.is_empty() {
        return Some(false); // no extensions at all
    }
    let n = r.u16()? as usize;
    let mut exts = Reader(r.take(n)?);
    while !exts.0.is_empty() {
        let typ = exts.u16()?;
        let n = exts.u16()? as usize;
        let data = exts.take(n)?;
        if typ == EXT_ALPN {
            let mut list = Reader(data);
            let n = list.u16()? as usize;
            let mut names = Reader(list.take(n)?);
            while !names.0.is_empty() {
                let n = names.u8()? as usize;
                if names.take(n)? == alpn {
                    return Some(true);
                }
            }
            return Some(false);
        }
    }
    Some(false)
}

/// A bounds-checked cursor: every read says `None` instead of panicking on short input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// A real ClientHello, as rustls sends it, offering `alpn`: for tests, fuzzing and benches.
pub fn sample_client_hello(alpn: &[&[u8]]) -> Vec<u8> {
    let provider = crate::tls::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("the default protocol versions are supported")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("example.com").expect("a valid DNS name");
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .expect("a client connection can start");
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = conn.write_tls(&mut out);
    out
}

/// How detection is bounded.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long to wait for enough bytes to decide.
    pub timeout: Duration,
    /// How many bytes may be buffered while deciding.
    pub max_bytes: usize,
}

/// Reads from `stream` until [`classify`] decides, the buffer is full, the peer closes, or the
/// timeout passes. Returns the verdict and the stream with everything read put back in front.
pub async fn detect<S>(
    mut stream: S,
    mesh_alpn: &[u8],
    limits: Limits,
) -> io::Result<(Protocol, Rewind<S>)>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + limits.timeout;
    let protocol = loop {
        if let Verdict::Done(p) = classify(&buf, mesh_alpn, limits.max_bytes) {
            break p;
        }
        buf.reserve(limits.max_bytes.saturating_sub(buf.len()).min(4096));
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => break Protocol::Timeout,
            // EOF before a decision: whatever arrived is all there is; it is not a hello.
            Ok(Ok(0)) if buf.is_empty() => break Protocol::Timeout,
            Ok(Ok(0)) => break Protocol::Plaintext,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((
        protocol,
        Rewind {
            prefix: buf,
            inner: stream,
        },
    ))
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    /// The bytes read during detection, not yet handed on.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: crate::proxy::relay::Abortable> crate::proxy::relay::Abortable for Rewind<S> {
    fn abort_on_close(&self) {
        self.inner.abort_on_close()
    }
}

/// The relay splits it as it splits a socket: tokio's `split`.
impl<S> crate::proxy::relay::Duplex for Rewind<S>
where
    S: AsyncRead + AsyncWrite + crate::proxy::relay::Abortable + Unpin,
{
    type Reader = tokio::io::ReadHalf<Self>;
    type Writer = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::Reader, Self::Writer) {
        tokio::io::split(self)
    }
    fn unsplit(reader: Self::Reader, writer: Self::Writer) -> Self {
        reader.unsplit(writer)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Give the detection buffer back: the connection may live for hours.
                self.prefix = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &[u8] = crate::tls::MESH_ALPN;
    const LIMIT: usize = 16 * 1024;

    /// A real ClientHello from rustls offering `alpn`. With `big`, a padding extension makes it
    /// as large as one carrying a post-quantum key share (X25519MLKEM768 adds 1,216 bytes),
    /// which the ring provider cannot produce itself.
    fn rustls_hello(alpn: &[&[u8]], big: bool) -> Vec<u8> {
        let mut out = sample_client_hello(alpn);
        if big {
            pad(&mut out, 1216);
        }
        out
    }

    /// Appends a padding extension (type 21) of `n` bytes, fixing up every length.
    fn pad(hello: &mut Vec<u8>, n: usize) {
        let mut at = 5 + 4 + 2 + 32; // record hdr, handshake hdr, version, random
        at += 1 + hello[at] as usize; // session id
        at += 2 + u16::from_be_bytes([hello[at], hello[at + 1]]) as usize; // cipher suites
        at += 1 + hello[at] as usize; // compression methods
        let ext_len = u16::from_be_bytes([hello[at], hello[at + 1]]) as usize + 4 + n;
        hello[at..at + 2].copy_from_slice(&(ext_len as u16).to_be_bytes());
        hello.extend_from_slice(&[0x00, 0x15]);
        hello.extend_from_slice(&(n as u16).to_be_bytes());
        hello.extend(std::iter::repeat_n(0u8, n));
        let rec_len = hello.len() - 5;
        hello[3..5].copy_from_slice(&(rec_len as u16).to_be_bytes());
        let hs_len = (rec_len - 4) as u32;
        hello[6..9].copy_from_slice(&hs_len.to_be_bytes()[1..]);
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Splits one ClientHello record into `n` records, as a client may fragment it.
    fn fragment(hello: &[u8], n: usize) -> Vec<u8> {
        let body = &hello[5..];
        let step = body.len().div_ceil(n);
        let mut out = Vec::new();
        for chunk in body.chunks(step) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn classifies_real_client_hellos() {
        let cases = [
            (
                "rustls, mesh ALPN",
                rustls_hello(&[MESH], false),
                Protocol::MeshTls,
            ),
            (
                "rustls, mesh ALPN among others",
                rustls_hello(&[b"h2", MESH], false),
                Protocol::MeshTls,
            ),
            (
                "rustls, PQ key share, mesh ALPN",
                rustls_hello(&[MESH], true),
                Protocol::MeshTls,
            ),
            (
                "rustls, h2 only",
                rustls_hello(&[b"h2"], false),
                Protocol::ForeignTls,
            ),
            (
                "rustls, no ALPN",
                rustls_hello(&[], false),
                Protocol::ForeignTls,
            ),
            (
                "curl https://",
                fixture("clienthello-curl.bin"),
                Protocol::ForeignTls,
            ),
            (
                "openssl s_client -alpn h2",
                fixture("clienthello-openssl.bin"),
                Protocol::ForeignTls,
            ),
            (
                "HTTP/1.1",
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                Protocol::Plaintext,
            ),
            (
                "HTTP/2 preface",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
                Protocol::Plaintext,
            ),
            ("one byte", b"x".to_vec(), Protocol::Plaintext),
            (
                "0x16 then junk",
                vec![0x16, 0x00, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
                Protocol::Plaintext,
            ),
            (
                "TLS alert record",
                vec![0x15, 0x03, 0x03, 0x00, 0x02, 2, 40],
                Protocol::Plaintext,
            ),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(classify(&bytes, MESH, LIMIT), Verdict::Done(want), "{name}");
        }
    }

    #[test]
    fn pq_sized_hello_is_larger_than_a_kilobyte() {
        // The reason detection must wait for several segments.
        assert!(rustls_hello(&[MESH], true).len() > 1024);
    }

    #[test]
    fn every_strict_prefix_of_a_hello_asks_for_more() {
        for hello in [rustls_hello(&[MESH], true), fixture("clienthello-curl.bin")] {
            for cut in 1..hello.len() {
                assert_eq!(
                    classify(&hello[..cut], MESH, LIMIT),
                    Verdict::NeedMore,
                    "cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn a_hello_split_across_records_is_reassembled() {
        let hello = rustls_hello(&[b"h2", MESH], true);
        for n in [2, 3, 7] {
            let split = fragment(&hello, n);
            assert_eq!(
                classify(&split, MESH, LIMIT),
                Verdict::Done(Protocol::MeshTls),
                "{n} records"
            );
            for cut in 1..split.len() {
                assert_eq!(classify(&split[..cut], MESH, LIMIT), Verdict::NeedMore);
            }
        }
    }

    #[test]
    fn oversized_and_malformed_hellos_are_not_ours() {
        let hello = rustls_hello(&[MESH], true);
        // Larger than the limit: decided without buffering it all.
        assert_eq!(
            classify(&hello, MESH, 512),
            Verdict::Done(Protocol::ForeignTls)
        );
        // A hello claiming 1 MiB.
        let huge = [0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x10, 0x00, 0x00];
        assert_eq!(
            classify(&huge, MESH, LIMIT),
            Verdict::Done(Protocol::ForeignTls)
        );
        // A handshake that is not a ClientHello (a ServerHello, type 2).
        let server_hello = [0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00];
        assert_eq!(
            classify(&server_hello, MESH, LIMIT),
            Verdict::Done(Protocol::ForeignTls)
        );
        // Truncated inside: lengths that point past the end of the hello.
        let mut broken = hello.clone();
        broken[5 + 4 + 34] = 0xff; // session id length
        assert_eq!(
            classify(&broken, MESH, LIMIT),
            Verdict::Done(Protocol::ForeignTls)
        );
        // A record longer than TLS allows.
        let long = [0x16, 0x03, 0x01, 0x48, 0x01, 0x01];
        assert_eq!(
            classify(&long, MESH, LIMIT),
            Verdict::Done(Protocol::Plaintext)
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 300) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            if x.is_multiple_of(2) && !bytes.is_empty() {
                bytes[0] = 0x16; // make the TLS path the common one
            }
            let _ = classify(&bytes, MESH, LIMIT);
        }
    }

    #[tokio::test]
    async fn detect_waits_for_segments_and_loses_no_byte() {
        let hello = rustls_hello(&[MESH], true);
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let h = hello.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in h.chunks(300) {
                client.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.write_all(b"after").await.unwrap();
        });
        let limits = Limits {
            timeout: Duration::from_secs(5),
            max_bytes: LIMIT,
        };
        let (protocol, mut rewound) = detect(server, MESH, limits).await.unwrap();
        assert_eq!(protocol, Protocol::MeshTls);
        let mut all = vec![0u8; hello.len() + 5];
        rewound.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..hello.len()], &hello[..]);
        assert_eq!(&all[hello.len()..], b"after");
    }

    #[tokio::test]
    async fn detect_times_out_on_silence_and_decides_plaintext_at_once() {
        let limits = Limits {
            timeout: Duration::from_millis(50),
            max_bytes: LIMIT,
        };
        let (_client, server) = tokio::io::duplex(1024);
        let (protocol, rewound) = detect(server, MESH, limits).await.unwrap();
        assert_eq!(protocol, Protocol::Timeout);
        assert!(rewound.prefix().is_empty());

        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"G")
            .await
            .unwrap();
        let limits = Limits {
            timeout: Duration::from_secs(3600),
            max_bytes: LIMIT,
        };
        let (protocol, rewound) = detect(server, MESH, limits).await.unwrap();
        assert_eq!(protocol, Protocol::Plaintext);
        assert_eq!(rewound.prefix(), b"G");
    }
}
