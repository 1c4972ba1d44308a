//! The wire protocol between a page server and its destinations, version 1.
//!
//! Every frame is a 24-byte header and a payload, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `UFPG` |
//! | 4..6 | version (1) |
//! | 6 | kind ([`Kind`]) |
//! | 7 | flags ([`ZERO`], [`LZ4`]) |
//! | 8..12 | payload length (at most [`MAX_PAYLOAD`]) |
//! | 12..16 | CRC-32 of the payload's meaning (see [`Frame::Data`]) or 0 |
//! | 16..24 | request id (0 for frames that answer none) |
//!
//! Payloads:
//! - **Hello** (server first, on every connection): page size u32, 0 u32,
//!   image length u64, image identity u64 (a new image under the same
//!   address is never mistaken for the old one).
//! - **Attach** (destination, answering Hello): channel u8 (1 demand, 2
//!   bulk), capabilities u8 ([`ACCEPTS_LZ4`]), 6 zero bytes, session u64
//!   (one per destination, the same on both channels and across
//!   reconnects).
//! - **Request** (destination): offset u64, length u32 (at most
//!   [`MAX_REQUEST`], non-zero), priority u8, 3 zero bytes.
//! - **Data** (server): offset u64, length u32, 4 zero bytes, then the bytes
//!   (none with the [`ZERO`] flag: the range is all zero). The header's CRC
//!   covers offset, length and bytes, so a frame moved to another offset is
//!   caught as surely as a flipped bit. A request is answered by Data with
//!   its id; pushed pages come with id 0. With the [`LZ4`] flag the bytes
//!   are compressed (servers do so only for destinations that accept it,
//!   and only where it shrinks the frame).
//! - **Error** (server): code u32, then a UTF-8 message (at most 1 KiB).
//!
//! Two connections per destination: the **demand** channel carries only
//! requests for faulting pages and their answers, so it is never queued
//! behind bulk data; the **bulk** channel carries background reads and the
//! server's push.

use std::fmt;

/// `UFPG`.
pub const MAGIC: [u8; 4] = *b"UFPG";
/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// Header length.
pub const HEADER: usize = 24;
/// The largest range one request may ask for.
pub const MAX_REQUEST: u32 = 4 << 20;
/// The largest payload of any frame: a whole [`MAX_REQUEST`] of data plus
/// its fixed fields.
pub const MAX_PAYLOAD: u32 = MAX_REQUEST + 16;
/// The longest error message.
pub const MAX_MESSAGE: usize = 1024;
/// Data flag: the range is all zero and no bytes follow.
pub const ZERO: u8 = 1;
/// Data flag: the bytes are one LZ4 block that decompresses to the range's
/// length (the CRC covers the decompressed bytes).
pub const LZ4: u8 = 2;
/// Attach capability: this destination decodes [`LZ4`] frames.
pub const ACCEPTS_LZ4: u8 = 1;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Server: what it serves.
    Hello = 1,
    /// Destination: which channel this connection is.
    Attach = 2,
    /// Destination: send me these bytes.
    Request = 3,
    /// Server: these bytes.
    Data = 4,
    /// Server: a request that cannot be served.
    Error = 5,
}

/// Which of a destination's two connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Faulting pages only: request, answer.
    Demand,
    /// Background reads and the server's push.
    Bulk,
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// What the server serves.
    Hello {
        /// Page size of the image, bytes.
        page_size: u32,
        /// Image length, bytes.
        image_len: u64,
        /// Identifies the image (its file's device, inode, size and
        /// modification time, hashed).
        identity: u64,
    },
    /// Which channel, for which destination.
    Attach {
        /// Demand or bulk.
        channel: Channel,
        /// [`ACCEPTS_LZ4`] or 0.
        capabilities: u8,
        /// The destination's session.
        session: u64,
    },
    /// A read.
    Request {
        /// Answered with this id.
        id: u64,
        /// Image offset.
        offset: u64,
        /// Bytes wanted.
        len: u32,
        /// 0 for a faulting page, higher for background work.
        priority: u8,
    },
    /// Bytes of the image.
    Data {
        /// The request answered, or 0 when pushed.
        id: u64,
        /// Image offset.
        offset: u64,
        /// Length of the range.
        len: u32,
        /// The bytes; `None` when the range is all zero.
        bytes: Option<Vec<u8>>,
    },
    /// A request that cannot be served.
    Error {
        /// The request.
        id: u64,
        /// [`ErrorCode`] as a number.
        code: u32,
        /// Why.
        message: String,
    },
}

/// Why a request failed on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// The range lies outside the image.
    OutOfRange = 1,
    /// Reading the image failed.
    Io = 2,
}

/// What is wrong with bytes that should be a frame. Any of these ends the
/// connection: the stream cannot be trusted past it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not this protocol.
    #[error("not a page-server frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// Another version.
    #[error("protocol version {0}; this build speaks {VERSION}")]
    Version(u16),
    /// An unknown kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A payload longer than any frame may be.
    #[error("a frame announces {0} bytes of payload; at most {MAX_PAYLOAD} are allowed")]
    TooLarge(u32),
    /// A payload whose length does not fit its kind.
    #[error("a {kind:?} frame of {len} bytes: {why}")]
    Malformed {
        /// The kind.
        kind: Kind,
        /// Its payload length.
        len: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The checksum does not match: corrupted in transit.
    #[error("data frame for {offset:#x}+{len:#x} fails its checksum")]
    Checksum {
        /// The request it answers (0: pushed).
        id: u64,
        /// Where it claims to belong.
        offset: u64,
        /// Its length.
        len: u32,
    },
}

impl Frame {
    fn kind(&self) -> Kind {
        match self {
            Frame::Hello { .. } => Kind::Hello,
            Frame::Attach { .. } => Kind::Attach,
            Frame::Request { .. } => Kind::Request,
            Frame::Data { .. } => Kind::Data,
            Frame::Error { .. } => Kind::Error,
        }
    }

    /// Appends the frame's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER]);
        let (mut flags, mut crc, mut id) = (0u8, 0u32, 0u64);
        match self {
            Frame::Hello {
                page_size,
                image_len,
                identity,
            } => {
                out.extend_from_slice(&page_size.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&image_len.to_le_bytes());
                out.extend_from_slice(&identity.to_le_bytes());
            }
            Frame::Attach {
                channel,
                capabilities,
                session,
            } => {
                out.push(match channel {
                    Channel::Demand => 1,
                    Channel::Bulk => 2,
                });
                out.push(*capabilities);
                out.extend_from_slice(&[0u8; 6]);
                out.extend_from_slice(&session.to_le_bytes());
            }
            Frame::Request {
                id: rid,
                offset,
                len,
                priority,
            } => {
                id = *rid;
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.push(*priority);
                out.extend_from_slice(&[0u8; 3]);
            }
            Frame::Data {
                id: rid,
                offset,
                len,
                bytes,
            } => {
                id = *rid;
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&[0u8; 4]);
                match bytes {
                    Some(b) => out.extend_from_slice(b),
                    None => flags |= ZERO,
                }
                crc = data_crc(*offset, *len, bytes.as_deref());
            }
            Frame::Error {
                id: rid,
                code,
                message,
            } => {
                id = *rid;
                out.extend_from_slice(&code.to_le_bytes());
                let mut end = message.len().min(MAX_MESSAGE);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&message.as_bytes()[..end]);
            }
        }
        let payload = (out.len() - start - HEADER) as u32;
        let h = &mut out[start..start + HEADER];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6] = self.kind() as u8;
        h[7] = flags;
        h[8..12].copy_from_slice(&payload.to_le_bytes());
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        h[16..24].copy_from_slice(&id.to_le_bytes());
    }
}

/// A checked header: how long the payload is, before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    kind: Kind,
    flags: u8,
    /// Payload bytes that follow.
    pub payload: u32,
    crc: u32,
    id: u64,
}

impl Header {
    /// Checks the 24 header bytes; the payload length is bounded by
    /// [`MAX_PAYLOAD`], so a reader may allocate it.
    pub fn decode(h: &[u8; HEADER]) -> Result<Header, ProtocolError> {
        let magic: [u8; 4] = h[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != VERSION {
            return Err(ProtocolError::Version(version));
        }
        let kind = match h[6] {
            1 => Kind::Hello,
            2 => Kind::Attach,
            3 => Kind::Request,
            4 => Kind::Data,
            5 => Kind::Error,
            other => return Err(ProtocolError::UnknownKind(other)),
        };
        let payload = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if payload > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge(payload));
        }
        Ok(Header {
            kind,
            flags: h[7],
            payload,
            crc: u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")),
            id: u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")),
        })
    }

    /// The length of a data frame's bytes when they travel as they are
    /// (neither a zero range nor compressed): a reader may read them
    /// straight into a buffer of their own and decode the frame with
    /// [`Header::data`].
    pub fn direct_len(&self) -> Option<usize> {
        let raw = self.kind == Kind::Data && self.flags & (ZERO | LZ4) == 0;
        (raw && self.payload >= 16).then(|| self.payload as usize - 16)
    }

    /// Decodes a data frame read in two parts, its 16 fixed bytes and its
    /// bytes (see [`Header::direct_len`]), with the checks
    /// [`Header::frame`] makes, and without copying the bytes.
    pub fn data(&self, fixed: &[u8; 16], bytes: Vec<u8>) -> Result<Frame, ProtocolError> {
        if self.direct_len() != Some(bytes.len()) {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                len: 16 + bytes.len(),
                why: "the payload is not the length the header announced",
            });
        }
        let (offset, len) = self.data_range(fixed)?;
        if data_crc(offset, len, Some(&bytes)) != self.crc {
            return Err(self.checksum_error(offset, len));
        }
        Ok(Frame::Data {
            id: self.id,
            offset,
            len,
            bytes: Some(bytes),
        })
    }

    /// The range a data frame whose bytes travel as they are (see
    /// [`Header::direct_len`]) carries, from its 16 fixed bytes, checked as
    /// [`Header::frame`] checks it.
    pub fn data_range(&self, fixed: &[u8; 16]) -> Result<(u64, u32), ProtocolError> {
        let bad = |why| ProtocolError::Malformed {
            kind: self.kind,
            len: self.payload as usize,
            why,
        };
        let Some(bytes) = self.direct_len() else {
            return Err(bad("not a data frame whose bytes travel as they are"));
        };
        let offset = u64::from_le_bytes(fixed[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_REQUEST || offset.checked_add(u64::from(len)).is_none() {
            return Err(bad("the range is empty, too long or wraps around"));
        }
        if bytes != len as usize {
            return Err(bad("the bytes are not the range's length"));
        }
        Ok((offset, len))
    }

    /// The request a frame answers (0: pushed).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The checksum the header carries.
    pub fn crc(&self) -> u32 {
        self.crc
    }

    /// The error for a data frame of this header whose bytes fail the
    /// checksum.
    pub fn checksum_error(&self, offset: u64, len: u32) -> ProtocolError {
        ProtocolError::Checksum {
            id: self.id,
            offset,
            len,
        }
    }

    /// Decodes the payload that followed this header.
    pub fn frame(&self, p: &[u8]) -> Result<Frame, ProtocolError> {
        let bad = |why| ProtocolError::Malformed {
            kind: self.kind,
            len: p.len(),
            why,
        };
        if p.len() != self.payload as usize {
            return Err(bad("the payload is not the length the header announced"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
        Ok(match self.kind {
            Kind::Hello => {
                if p.len() != 24 {
                    return Err(bad("a hello is 24 bytes"));
                }
                let page_size = u32_at(0);
                if page_size != 4096 && page_size != 2 << 20 {
                    return Err(bad("the page size is neither 4 KiB nor 2 MiB"));
                }
                Frame::Hello {
                    page_size,
                    image_len: u64_at(8),
                    identity: u64_at(16),
                }
            }
            Kind::Attach => {
                if p.len() != 16 {
                    return Err(bad("an attach is 16 bytes"));
                }
                let channel = match p[0] {
                    1 => Channel::Demand,
                    2 => Channel::Bulk,
                    _ => return Err(bad("the channel is neither demand (1) nor bulk (2)")),
                };
                Frame::Attach {
                    channel,
                    capabilities: p[1],
                    session: u64_at(8),
                }
            }
            Kind::Request => {
                if p.len() != 16 {
                    return Err(bad("a request is 16 bytes"));
                }
                let (offset, len) = (u64_at(0), u32_at(8));
                if len == 0 || len > MAX_REQUEST {
                    return Err(bad("a request asks for 1 byte to 4 MiB"));
                }
                if offset.checked_add(u64::from(len)).is_none() {
                    return Err(bad("the range wraps around"));
                }
                Frame::Request {
                    id: self.id,
                    offset,
                    len,
                    priority: p[12],
                }
            }
            Kind::Data => {
                if p.len() < 16 {
                    return Err(bad("a data frame has 16 bytes before its data"));
                }
                let (offset, len) = (u64_at(0), u32_at(8));
                if len == 0 || len > MAX_REQUEST || offset.checked_add(u64::from(len)).is_none() {
                    return Err(bad("the range is empty, too long or wraps around"));
                }
                let bytes = if self.flags & ZERO != 0 {
                    if p.len() != 16 {
                        return Err(bad("a zero range carries no bytes"));
                    }
                    None
                } else if self.flags & LZ4 != 0 {
                    // Decoding writes at most `len` bytes (at most 4 MiB);
                    // a block that does not decode to exactly that is
                    // treated as corrupted in transit, like a bad CRC.
                    match lz4_flex::block::decompress(&p[16..], len as usize) {
                        Ok(b) if b.len() == len as usize => Some(b),
                        _ => {
                            return Err(ProtocolError::Checksum {
                                id: self.id,
                                offset,
                                len,
                            })
                        }
                    }
                } else {
                    if p.len() - 16 != len as usize {
                        return Err(bad("the bytes are not the range's length"));
                    }
                    Some(p[16..].to_vec())
                };
                if data_crc(offset, len, bytes.as_deref()) != self.crc {
                    return Err(ProtocolError::Checksum {
                        id: self.id,
                        offset,
                        len,
                    });
                }
                Frame::Data {
                    id: self.id,
                    offset,
                    len,
                    bytes,
                }
            }
            Kind::Error => {
                if p.len() < 4 || p.len() > 4 + MAX_MESSAGE {
                    return Err(bad("an error is a code and at most 1 KiB of text"));
                }
                Frame::Error {
                    id: self.id,
                    code: u32_at(0),
                    message: String::from_utf8_lossy(&p[4..]).into_owned(),
                }
            }
        })
    }
}

/// The header and fixed fields of a data frame carrying `bytes`, which
/// follow it on the wire: the same bytes [`Frame::encode`] writes before
/// them.
pub fn data_head(id: u64, offset: u64, len: u32, bytes: &[u8]) -> [u8; HEADER + 16] {
    let crc = data_crc(offset, len, Some(bytes));
    fixed_head(Kind::Data, 16 + bytes.len(), crc, id, offset, len)
}

/// A request frame, encoded where it is made: the same bytes
/// [`Frame::encode`] writes for [`Frame::Request`], with no allocation (a
/// faulting page's request is made on the fault's path).
pub fn request_bytes(id: u64, offset: u64, len: u32, priority: u8) -> [u8; HEADER + 16] {
    let mut frame = fixed_head(Kind::Request, 16, 0, id, offset, len);
    frame[36] = priority;
    frame
}

/// The header and the fixed fields (`offset`, `len`) that data and request
/// frames share, of a frame whose payload is `payload_len` bytes.
fn fixed_head(
    kind: Kind,
    payload_len: usize,
    crc: u32,
    id: u64,
    offset: u64,
    len: u32,
) -> [u8; HEADER + 16] {
    let mut head = [0u8; HEADER + 16];
    head[0..4].copy_from_slice(&MAGIC);
    head[4..6].copy_from_slice(&VERSION.to_le_bytes());
    head[6] = kind as u8;
    head[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    head[12..16].copy_from_slice(&crc.to_le_bytes());
    head[16..24].copy_from_slice(&id.to_le_bytes());
    head[24..32].copy_from_slice(&offset.to_le_bytes());
    head[32..36].copy_from_slice(&len.to_le_bytes());
    head
}

/// A data frame carrying `bytes` compressed, when that shrinks it by at
/// least an eighth: the header and fixed fields followed by the LZ4 block.
pub fn compressed_data(id: u64, offset: u64, len: u32, bytes: &[u8]) -> Option<Vec<u8>> {
    let block = lz4_flex::block::compress(bytes);
    if block.len() > bytes.len() - bytes.len() / 8 {
        return None;
    }
    let mut head = data_head(id, offset, len, bytes);
    head[7] = LZ4;
    head[8..12].copy_from_slice(&((16 + block.len()) as u32).to_le_bytes());
    let mut out = Vec::with_capacity(head.len() + block.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&block);
    Some(out)
}

/// Decodes one whole frame from the front of `buf`: `Ok(None)` when more
/// bytes are needed, else the frame and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some(h) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let header = Header::decode(h.try_into().expect("header length"))?;
    let end = HEADER + header.payload as usize;
    let Some(payload) = buf.get(HEADER..end) else {
        return Ok(None);
    };
    Ok(Some((header.frame(payload)?, end)))
}

/// The CRC a data frame carries: over its offset, length and bytes (a zero
/// range: offset and length only).
pub fn data_crc(offset: u64, len: u32, bytes: Option<&[u8]>) -> u32 {
    let mut h = data_crc_start(offset, len);
    if let Some(b) = bytes {
        h.update(b);
    }
    h.finalize()
}

/// [`data_crc`] before the bytes, for a reader that checks them as they
/// arrive.
pub(crate) fn data_crc_start(offset: u64, len: u32) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(&offset.to_le_bytes());
    h.update(&len.to_le_bytes());
    h
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channel::Demand => "demand",
            Channel::Bulk => "bulk",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame) {
        let mut buf = Vec::new();
        f.encode(&mut buf);
        let (g, used) = decode(&buf).unwrap().unwrap();
        assert_eq!(g, f);
        assert_eq!(used, buf.len());
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Ok(None));
        }
    }

    #[test]
    fn every_kind_round_trips() {
        round_trip(Frame::Hello {
            page_size: 4096,
            image_len: 1 << 30,
            identity: 7,
        });
        round_trip(Frame::Attach {
            channel: Channel::Bulk,
            capabilities: ACCEPTS_LZ4,
            session: 42,
        });
        round_trip(Frame::Request {
            id: 9,
            offset: 8192,
            len: 4096,
            priority: 0,
        });
        round_trip(Frame::Data {
            id: 9,
            offset: 8192,
            len: 5,
            bytes: Some(b"hello".to_vec()),
        });
        round_trip(Frame::Data {
            id: 0,
            offset: 0,
            len: 4096,
            bytes: None,
        });
        round_trip(Frame::Error {
            id: 3,
            code: ErrorCode::OutOfRange as u32,
            message: "past the end".into(),
        });
    }

    #[test]
    fn a_flipped_bit_or_a_moved_frame_fails_the_checksum() {
        let mut buf = Vec::new();
        Frame::Data {
            id: 1,
            offset: 4096,
            len: 4,
            bytes: Some(vec![1, 2, 3, 4]),
        }
        .encode(&mut buf);
        let mut flipped = buf.clone();
        *flipped.last_mut().unwrap() ^= 0x10;
        assert!(matches!(
            decode(&flipped),
            Err(ProtocolError::Checksum { .. })
        ));
        let mut moved = buf.clone();
        moved[HEADER] ^= 0x20; // offset 4096 -> another page
        assert!(matches!(
            decode(&moved),
            Err(ProtocolError::Checksum { .. })
        ));
    }

    #[test]
    fn a_request_made_in_place_is_what_encode_writes() {
        for (id, offset, len, priority) in [(1, 0, 4096, 0), (u64::MAX, 1 << 40, MAX_REQUEST, 1)] {
            let mut buf = Vec::new();
            Frame::Request {
                id,
                offset,
                len,
                priority,
            }
            .encode(&mut buf);
            assert_eq!(&buf[..], &request_bytes(id, offset, len, priority)[..]);
        }
    }

    #[test]
    fn a_data_head_is_what_encode_writes_before_the_bytes() {
        let bytes = vec![3u8; 100];
        let mut buf = Vec::new();
        Frame::Data {
            id: 5,
            offset: 4096,
            len: 100,
            bytes: Some(bytes.clone()),
        }
        .encode(&mut buf);
        assert_eq!(&buf[..HEADER + 16], &data_head(5, 4096, 100, &bytes)[..]);
    }

    #[test]
    fn compressed_frames_decode_to_their_bytes_and_garbage_blocks_are_caught() {
        let bytes: Vec<u8> = (0..65536u32).map(|i| (i / 512) as u8).collect();
        let wire = compressed_data(4, 8192, bytes.len() as u32, &bytes).expect("compresses");
        assert!(wire.len() < bytes.len() / 4);
        let (frame, used) = decode(&wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(
            frame,
            Frame::Data {
                id: 4,
                offset: 8192,
                len: bytes.len() as u32,
                bytes: Some(bytes.clone()),
            }
        );
        let mut broken = wire.clone();
        let last = broken.len() - 3;
        broken[last] ^= 0xff;
        assert!(matches!(
            decode(&broken),
            Err(ProtocolError::Checksum { .. })
        ));
        // Random bytes do not shrink: sent as they are.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(compressed_data(1, 0, 4096, &noise).is_none());
    }

    #[test]
    fn a_huge_frame_is_refused_from_its_header() {
        let mut buf = Vec::new();
        Frame::Request {
            id: 1,
            offset: 0,
            len: 4096,
            priority: 0,
        }
        .encode(&mut buf);
        buf[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&buf), Err(ProtocolError::TooLarge(u32::MAX)));
    }
}
