//! Reading and writing frames on a byte stream.

// Pushed frames are read from the socket straight into the landing area,
// through raw pointers a `Place` hands out.
#![allow(unsafe_code)]

use std::sync::Arc;

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

/// Where a pushed data frame's pages may be read to straight from the
/// socket: the destination's landing area.
///
/// # Safety
/// For a page [`Place::claim`] held, `at(its offset)` points to 4 KiB that
/// stay mapped and writable while the place lives, and that nothing else
/// reads or writes until [`Place::publish`] or [`Place::abandon`] releases
/// the claim; pages of one claim are contiguous.
pub(crate) unsafe trait Place: Send + Sync {
    /// Claims what it can of the whole pages of `offset..offset + len`
    /// (pages written already, or being written, are not held); `None`
    /// when the range is not whole pages of the place.
    fn claim(&self, offset: u64, len: u32) -> Option<Claim>;
    /// The address of the byte at `offset`.
    fn at(&self, offset: u64) -> *mut u8;
    /// The held pages hold their bytes, checked: publish them.
    fn publish(&self, claim: &Claim);
    /// The held pages' bytes are wrong or incomplete: release them, as if
    /// nothing had been written.
    fn abandon(&self, claim: &Claim);
}

/// The pages of a frame a [`Place`] holds for it.
#[derive(Debug)]
pub(crate) struct Claim {
    /// The frame's offset (page aligned).
    pub(crate) offset: u64,
    /// Per page of the frame: held (its bytes go in place) or not (they
    /// are read and dropped).
    pub(crate) held: Vec<bool>,
}

/// What [`FrameReader::next_placed`] read.
#[derive(Debug)]
pub(crate) enum Read {
    /// A frame.
    Frame(Frame),
    /// A pushed data frame whose bytes went straight to the place, checked
    /// and published; `written` pages of it were held.
    Landed { len: u32, written: u64 },
}

/// Data frames carrying at least this many bytes are read from the socket
/// straight into the buffer that becomes the frame's bytes (or, pushed
/// ones, into the landing area): one copy out of the socket, where going
/// through the reader's buffer adds a copy into it and one out (and a
/// shift of what follows).
const DIRECT: usize = 16 << 10;

/// A data frame whose bytes are being read straight to where they go.
#[derive(Debug)]
struct Partial {
    header: Header,
    fixed: [u8; 16],
    want: usize,
    into: Into,
}

#[derive(Debug)]
enum Into {
    /// The frame's own buffer.
    Own(Vec<u8>),
    /// The landing area.
    Placed(Placed),
}

/// A pushed frame being read into a [`Place`]; dropped unfinished (the
/// link failed), it abandons its claim.
struct Placed {
    place: Arc<dyn Place>,
    claim: Claim,
    len: u32,
    crc: crc32fast::Hasher,
    done: usize,
    /// Where the bytes of pages not held go.
    scratch: Vec<u8>,
    finished: bool,
}

impl std::fmt::Debug for Placed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placed")
            .field("offset", &self.claim.offset)
            .field("len", &self.len)
            .field("done", &self.done)
            .finish()
    }
}

impl Placed {
    /// Where the next bytes go, and how many may go there in one piece:
    /// to the end of the run of held (or not held) pages.
    fn target(&mut self) -> (*mut u8, usize) {
        let (k, within) = (self.done / 4096, self.done % 4096);
        let held = &self.claim.held;
        if held[k] {
            let end = (k..held.len()).find(|&e| !held[e]).unwrap_or(held.len());
            let ptr = self.place.at(self.claim.offset + self.done as u64);
            (ptr, end * 4096 - self.done)
        } else {
            // SAFETY: `within` < 4096, the scratch page's length.
            (
                unsafe { self.scratch.as_mut_ptr().add(within) },
                4096 - within,
            )
        }
    }

    /// Counts `n` bytes just written at `target()`'s address.
    fn wrote(&mut self, n: usize) {
        let (ptr, room) = self.target();
        debug_assert!(n <= room);
        // SAFETY: `ptr..ptr + n` was just written by this reader: a held
        // page (see `Place`) or the scratch page.
        self.crc
            .update(unsafe { std::slice::from_raw_parts(ptr, n) });
        self.done += n;
    }

    /// Copies bytes that arrived with the header.
    fn put(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (ptr, room) = self.target();
            let n = room.min(bytes.len());
            // SAFETY: `target` names `room` writable bytes that only this
            // reader touches, apart from `bytes` (the reader's buffer).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, n) };
            self.wrote(n);
            bytes = &bytes[n..];
        }
    }

    /// Checks the whole frame and publishes or abandons its pages.
    fn finish(&mut self, header: &Header) -> Result<Read, ProtocolError> {
        self.finished = true;
        if self.crc.clone().finalize() != header.crc() {
            self.place.abandon(&self.claim);
            return Err(header.checksum_error(self.claim.offset, self.len));
        }
        self.place.publish(&self.claim);
        Ok(Read::Landed {
            len: self.len,
            written: self.claim.held.iter().filter(|&&h| h).count() as u64,
        })
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        if !self.finished {
            self.place.abandon(&self.claim);
        }
    }
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
        Ok(self.next_placed(None).await?.map(|read| match read {
            Read::Frame(f) => f,
            Read::Landed { .. } => unreachable!("nothing is landed without a place"),
        }))
    }

    /// Like [`FrameReader::next`], but pushed data frames (id 0) whose
    /// bytes travel as they are go straight from the socket to `place`,
    /// their pages published once the whole frame passed its checksum.
    pub(crate) async fn next_placed(
        &mut self,
        place: Option<&Arc<dyn Place>>,
    ) -> Result<Option<Read>, LinkError> {
        loop {
            if let Some(p) = &mut self.partial {
                match &mut p.into {
                    Into::Own(bytes) if bytes.len() == p.want => {
                        let p = self.partial.take().expect("seen above");
                        let Into::Own(bytes) = p.into else {
                            unreachable!()
                        };
                        return Ok(Some(Read::Frame(p.header.data(&p.fixed, bytes)?)));
                    }
                    Into::Own(bytes) => {
                        let rest = (p.want - bytes.len()) as u64;
                        // `take` keeps the read inside this frame; the
                        // buffer's room was reserved once, bounded by
                        // MAX_PAYLOAD.
                        let n = (&mut self.inner).take(rest).read_buf(bytes).await?;
                        if n == 0 {
                            return Err(eof().into());
                        }
                    }
                    Into::Placed(placed) if placed.done == p.want => {
                        let read = placed.finish(&p.header);
                        self.partial = None;
                        return Ok(Some(read?));
                    }
                    Into::Placed(placed) => {
                        let (ptr, room) = placed.target();
                        let room = room.min(p.want - placed.done);
                        // SAFETY: `target` names `room` bytes of a page
                        // this frame holds (see `Place`) or of the scratch
                        // page, which nothing else touches meanwhile; the
                        // slice lives only for this read.
                        let slice = unsafe { std::slice::from_raw_parts_mut(ptr, room) };
                        let n = self.inner.read(slice).await?;
                        if n == 0 {
                            return Err(eof().into());
                        }
                        placed.wrote(n);
                    }
                }
                continue;
            }
            if self.buf.len() >= HEADER {
                let header = Header::decode(self.buf[..HEADER].try_into().expect("header length"))?;
                let end = HEADER + header.payload as usize;
                match header.direct_len() {
                    Some(want) if want >= DIRECT => {
                        if self.buf.len() >= HEADER + 16 {
                            let fixed: [u8; 16] =
                                self.buf[HEADER..HEADER + 16].try_into().expect("16 bytes");
                            let have = (self.buf.len() - HEADER - 16).min(want);
                            let into = match place.filter(|_| header.id() == 0) {
                                Some(place) => {
                                    let (offset, len) = header.data_range(&fixed)?;
                                    place.claim(offset, len).map(|claim| {
                                        Into::Placed(Placed {
                                            place: Arc::clone(place),
                                            claim,
                                            len,
                                            crc: crate::protocol::data_crc_start(offset, len),
                                            done: 0,
                                            scratch: vec![0; 4096],
                                            finished: false,
                                        })
                                    })
                                }
                                None => None,
                            };
                            let mut into = into.unwrap_or_else(|| {
                                // Bounded by MAX_PAYLOAD, which the header
                                // check enforced.
                                let mut bytes = self.spare.take().unwrap_or_default();
                                bytes.reserve_exact(want);
                                Into::Own(bytes)
                            });
                            let arrived = &self.buf[HEADER + 16..HEADER + 16 + have];
                            match &mut into {
                                Into::Own(bytes) => bytes.extend_from_slice(arrived),
                                Into::Placed(placed) => placed.put(arrived),
                            }
                            self.buf.drain(..HEADER + 16 + have);
                            self.partial = Some(Partial {
                                header,
                                fixed,
                                want,
                                into,
                            });
                            continue;
                        }
                    }
                    _ if self.buf.len() >= end => {
                        let frame = header.frame(&self.buf[HEADER..end]);
                        self.buf.drain(..end);
                        return Ok(Some(Read::Frame(frame?)));
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
            // either happened or did not). Where frames may be placed (the
            // bulk channel: mostly pushed frames of 256 KiB), no further
            // than the next header and fixed fields: the bytes after them
            // are read into place, not into this buffer and copied out.
            let n = if place.is_some() && self.buf.len() < HEADER + 16 {
                let head = (HEADER + 16 - self.buf.len()) as u64;
                (&mut self.inner).take(head).read_buf(&mut self.buf).await?
            } else {
                self.inner.read_buf(&mut self.buf).await?
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(eof().into())
                };
            }
        }
    }
}

fn eof() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::UnexpectedEof)
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
        return write_data(w, &head, bytes).await;
    }
    let mut buf = Vec::new();
    frame.encode(&mut buf);
    w.write_all(&buf).await
}

/// Writes a data frame's head and its bytes in one vectored write where the
/// socket takes them: one system call a frame, and no segment of the head
/// alone on the wire ahead of its bytes (with TCP_NODELAY, two writes send
/// two), which a link that counts packets or buffers pays for.
pub(crate) async fn write_data<W: AsyncWrite + Unpin>(
    w: &mut W,
    head: &[u8],
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut parts = [std::io::IoSlice::new(head), std::io::IoSlice::new(bytes)];
    let mut parts = &mut parts[..];
    while !parts.is_empty() {
        match w.write_vectored(parts).await? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => std::io::IoSlice::advance_slices(&mut parts, n),
        }
    }
    Ok(())
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

    /// Takes at most `step` bytes per write, vectored or not, as a socket
    /// with a full buffer does.
    struct Dribble {
        out: Vec<u8>,
        step: usize,
        vectored_calls: usize,
    }

    impl AsyncWrite for Dribble {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = self.step.min(buf.len());
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.vectored_calls += 1;
            let mut room = self.step;
            for b in bufs {
                let n = room.min(b.len());
                self.out.extend_from_slice(&b[..n]);
                room -= n;
            }
            Poll::Ready(Ok(self.step - room))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_data_frame_goes_out_whole_in_one_write_or_in_many() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let frame = data(9, 1 << 20, 64 << 10, 11);
        let mut want = Vec::new();
        frame.encode(&mut want);
        for step in [1, 7, HEADER + 16, HEADER + 17, 4096, usize::MAX] {
            let mut w = Dribble {
                out: Vec::new(),
                step,
                vectored_calls: 0,
            };
            runtime.block_on(write_frame(&mut w, &frame)).unwrap();
            assert!(w.out == want, "step {step}: the bytes differ");
            // Head and bytes together, in as few writes as the writer allows.
            assert_eq!(w.vectored_calls, want.len().div_ceil(step), "step {step}");
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

    /// A landing area of 64 pages that records what was published and
    /// abandoned; pages listed in `taken` are never held.
    struct Recorder {
        memory: uffd::Mapping,
        taken: Vec<u64>,
        published: std::sync::Mutex<Vec<u64>>,
        abandoned: std::sync::Mutex<Vec<u64>>,
    }

    // SAFETY: `at` points into `memory`, owned by the recorder; the tests
    // read it only after the reader is done with a frame.
    unsafe impl Place for Recorder {
        fn claim(&self, offset: u64, len: u32) -> Option<Claim> {
            let first = offset / 4096;
            let held = (first..first + u64::from(len) / 4096)
                .map(|p| !self.taken.contains(&p))
                .collect();
            Some(Claim { offset, held })
        }
        fn at(&self, offset: u64) -> *mut u8 {
            self.memory.as_ptr().wrapping_add(offset as usize)
        }
        fn publish(&self, claim: &Claim) {
            let mut p = self.published.lock().unwrap();
            p.extend(
                (0..claim.held.len() as u64)
                    .filter(|&k| claim.held[k as usize])
                    .map(|k| claim.offset / 4096 + k),
            );
        }
        fn abandon(&self, claim: &Claim) {
            let mut p = self.abandoned.lock().unwrap();
            p.extend(
                (0..claim.held.len() as u64)
                    .filter(|&k| claim.held[k as usize])
                    .map(|k| claim.offset / 4096 + k),
            );
        }
    }

    #[test]
    fn pushed_frames_land_in_place_checked_and_whole_or_not_at_all() {
        let recorder = Arc::new(Recorder {
            memory: uffd::Mapping::new(uffd::MemoryKind::Anon, 64 * 4096).unwrap(),
            taken: vec![2],
            published: Default::default(),
            abandoned: Default::default(),
        });
        let place: Arc<dyn Place> = Arc::clone(&recorder) as Arc<dyn Place>;
        // Pages 0..8 pushed; an answer (id 5) for 8..16, which is not
        // placed; 16..24 pushed with a flipped byte; 24..32 pushed whole;
        // 32..40 pushed but cut short by the end of the stream.
        let frames = [
            data(0, 0, 8 * 4096, 3),
            data(5, 8 * 4096, 8 * 4096, 5),
            data(0, 16 * 4096, 8 * 4096, 7),
            data(0, 24 * 4096, 8 * 4096, 11),
            data(0, 32 * 4096, 8 * 4096, 13),
        ];
        let mut wire = Vec::new();
        let mut starts = Vec::new();
        for f in &frames {
            starts.push(wire.len());
            f.encode(&mut wire);
        }
        wire[starts[2] + HEADER + 16 + 3 * 4096 + 17] ^= 1;
        wire.truncate(starts[4] + HEADER + 16 + 5000);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = |f: &Frame| match f {
            Frame::Data { bytes: Some(b), .. } => b.clone(),
            _ => unreachable!(),
        };
        let mut reader = FrameReader::new(Trickle {
            bytes: wire,
            at: 0,
            step: 3000,
        });
        let mut next = || runtime.block_on(reader.next_placed(Some(&place)));
        assert!(matches!(
            next().unwrap(),
            Some(Read::Landed {
                len: 32768,
                written: 7
            })
        ));
        assert!(matches!(next().unwrap(), Some(Read::Frame(f)) if f == frames[1]));
        assert!(matches!(
            next(),
            Err(LinkError::Protocol(ProtocolError::Checksum { id: 0, .. }))
        ));
        assert!(matches!(
            next().unwrap(),
            Some(Read::Landed {
                len: 32768,
                written: 8
            })
        ));
        assert!(next().is_err(), "the stream ends inside a frame");
        drop(reader);
        let mut got = vec![0u8; 64 * 4096];
        recorder.memory.read(0, &mut got);
        let (first, fourth) = (bytes(&frames[0]), bytes(&frames[3]));
        for p in 0..8usize {
            let want: &[u8] = if p == 2 {
                &[0; 4096]
            } else {
                &first[p * 4096..(p + 1) * 4096]
            };
            assert_eq!(&got[p * 4096..(p + 1) * 4096], want, "page {p}");
        }
        for p in 24..32usize {
            let want: &[u8] = &fourth[(p - 24) * 4096..(p - 23) * 4096];
            assert_eq!(&got[p * 4096..(p + 1) * 4096], want, "page {p}");
        }
        let published = recorder.published.lock().unwrap().clone();
        let want: Vec<u64> = (0..8).filter(|&p| p != 2).chain(24..32).collect();
        assert_eq!(published, want);
        // The corrupt frame and the one cut short are abandoned, every
        // page they held.
        let abandoned = recorder.abandoned.lock().unwrap().clone();
        let want: Vec<u64> = (16..24).chain(32..40).collect();
        assert_eq!(abandoned, want);
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
