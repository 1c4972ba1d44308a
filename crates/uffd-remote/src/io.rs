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

/// Reads frames; cancel-safe (what was read stays in its buffer), so it
/// can sit in a `select!` beside other work.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Frames from `inner`.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: Vec::with_capacity(64 << 10),
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream. A frame that
    /// arrived whole but fails its checks is consumed and returned as the
    /// error, so the stream stays in step (a checksum failure need not end
    /// the connection); a bad header ends it.
    pub async fn next(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if self.buf.len() >= HEADER {
                let header = Header::decode(self.buf[..HEADER].try_into().expect("header length"))?;
                let end = HEADER + header.payload as usize;
                if self.buf.len() >= end {
                    let frame = header.frame(&self.buf[HEADER..end]);
                    self.buf.drain(..end);
                    return Ok(Some(frame?));
                }
                // Bounded by MAX_PAYLOAD, which the header check enforced.
                self.buf.reserve(end - self.buf.len());
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
