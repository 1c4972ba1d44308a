//! Reading and writing frames on a byte stream.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{Frame, Header, ProtocolError, HEADER};

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that is not a valid frame.
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
}

/// Data frames carrying at least this many bytes are read from the socket
/// straight into the buffer that becomes the frame's bytes: one copy out
/// of the socket, where going through the reader's buffer adds a copy into
/// it and one out (and a shift of what follows).
const DIRECT: usize = 16 << 10;

/// A data frame whose bytes are being read straight into their own buffer.
#[derive(Debug)]
struct Partial {
    header: Header,
    fixed: [u8; 16],
    bytes: Vec<u8>,
    want: usize,
}

/// Reads frames; cancel-safe (what was read stays in its buffer), so it
/// can sit in a `select!` beside other work.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    partial: Option<Partial>,
    /// A data frame's buffer handed back ([`FrameReader::recycle`]), for
    /// the next one: no allocation, and no page faults on fresh memory,
    /// per frame.
    spare: Option<Vec<u8>>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Frames from `inner`.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: Vec::with_capacity(64 << 10),
            partial: None,
            spare: None,
        }
    }

    /// Hands back the bytes of a data frame that are no longer needed, to
    /// read the next one into.
    pub fn recycle(&mut self, mut bytes: Vec<u8>) {
        bytes.clear();
        self.spare = Some(bytes);
    }

    /// The next frame; `Ok(None)` at a clean end of stream. A frame that
    /// arrived whole but fails its checks is consumed and returned as the
    /// error, so the stream stays in step (a checksum failure need not end
    /// the connection); a bad header ends it.
    pub async fn next(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if let Some(p) = &mut self.partial {
                if p.bytes.len() == p.want {
                    let p = self.partial.take().expect("seen above");
                    return Ok(Some(p.header.data(&p.fixed, p.bytes)?));
                }
                let rest = (p.want - p.bytes.len()) as u64;
                // `take` keeps the read inside this frame; the buffer's
                // room was reserved once, bounded by MAX_PAYLOAD.
                let n = (&mut self.inner).take(rest).read_buf(&mut p.bytes).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                continue;
            }
            if self.buf.len() >= HEADER {
                let header = Header::decode(self.buf[..HEADER].try_into().expect("header length"))?;
                let end = HEADER + header.payload as usize;
                match header.direct_len() {
                    Some(want) if want >= DIRECT => {
                        if self.buf.len() >= HEADER + 16 {
                            let fixed = self.buf[HEADER..HEADER + 16].try_into().expect("16 bytes");
                            let have = (self.buf.len() - HEADER - 16).min(want);
                            // Bounded by MAX_PAYLOAD, which the header
                            // check enforced.
                            let mut bytes = self.spare.take().unwrap_or_default();
                            bytes.reserve_exact(want);
                            bytes.extend_from_slice(&self.buf[HEADER + 16..HEADER + 16 + have]);
                            self.buf.drain(..HEADER + 16 + have);
                            self.partial = Some(Partial {
                                header,
                                fixed,
                                bytes,
                                want,
                            });
                            continue;
                        }
                    }
                    _ if self.buf.len() >= end => {
                        let frame = header.frame(&self.buf[HEADER..end]);
                        self.buf.drain(..end);
                        return Ok(Some(frame?));
                    }
                    // Bounded by MAX_PAYLOAD, which the header check
                    // enforced.
                    _ => self.buf.reserve(end - self.buf.len()),
                }
            }
            if self.buf.capacity() - self.buf.len() < 16 << 10 {
                self.buf.reserve(64 << 10);
            }
            // Straight into the buffer's spare room (cancel-safe: a read
            // either happened or did not).
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
                };
            }
        }
    }
}

/// Writes one frame. A data frame's bytes go out from where they are,
/// after its header: no copy of them into a frame buffer.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    if let Frame::Data {
        id,
        offset,
        len,
        bytes: Some(bytes),
    } = frame
    {
        let head = crate::protocol::data_head(*id, *offset, *len, bytes);
        w.write_all(&head).await?;
        return w.write_all(bytes).await;
    }
    let mut buf = Vec::new();
    frame.encode(&mut buf);
    w.write_all(&buf).await
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;
    use crate::protocol::{decode, ProtocolError};

    /// Hands out at most `step` bytes per read, as a socket under load does.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self
                .step
                .min(buf.remaining())
                .min(self.bytes.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.bytes[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn data(id: u64, offset: u64, len: usize, seed: u8) -> Frame {
        Frame::Data {
            id,
            offset,
            len: len as u32,
            bytes: Some(
                (0..len)
                    .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
                    .collect(),
            ),
        }
    }

    #[test]
    fn frames_read_straight_into_their_buffers_decode_like_whole_ones() {
        let frames = [
            data(1, 0, 4096, 3),
            data(0, 1 << 20, 1 << 20, 5),
            Frame::Data {
                id: 2,
                offset: 8192,
                len: 4096,
                bytes: None,
            },
            data(3, 4 << 20, 256 << 10, 7),
            data(4, 12288, DIRECT, 9),
        ];
        let mut wire = Vec::new();
        let mut ends = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
            ends.push(wire.len());
        }
        // A flipped byte in the big frame's bytes: caught, and the stream
        // stays in step for the frames after it.
        let mut corrupt = wire.clone();
        corrupt[ends[0] + HEADER + 16 + 1000] ^= 0x40;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for step in [1, 7, 4096, 100_000, usize::MAX] {
            let mut reader = FrameReader::new(Trickle {
                bytes: wire.clone(),
                at: 0,
                step,
            });
            for f in &frames {
                let got = runtime.block_on(reader.next()).unwrap();
                assert_eq!(got.as_ref(), Some(f), "step {step}");
            }
            assert!(runtime.block_on(reader.next()).unwrap().is_none());

            let mut reader = FrameReader::new(Trickle {
                bytes: corrupt.clone(),
                at: 0,
                step,
            });
            assert_eq!(
                runtime.block_on(reader.next()).unwrap().as_ref(),
                Some(&frames[0])
            );
            assert!(matches!(
                runtime.block_on(reader.next()),
                Err(LinkError::Protocol(ProtocolError::Checksum { id: 0, .. }))
            ));
            for f in &frames[2..] {
                assert_eq!(runtime.block_on(reader.next()).unwrap().as_ref(), Some(f));
            }
        }
        // And decode agrees on every frame.
        let mut at = 0;
        for f in &frames {
            let (got, used) = decode(&wire[at..]).unwrap().unwrap();
            assert_eq!(&got, f);
            at += used;
        }
    }
}
