//! The L4 stream preamble: the first bytes on every `weft-l4` QUIC stream.
//!
//! A client sidecar opens a bidirectional stream per TCP connection (or per
//! UDP flow, see `docs/udp.md`), writes a [`Request`] naming the target, and
//! waits for a [`Response`] before any application byte (or datagram) flows.
//! Decoding is pure (no I/O) and total: any input yields `Ok`, `Incomplete`
//! or a descriptive error, never a panic.
//!
//! Request (integers big-endian):
//! ```text
//! 0      magic       "WL"            2 bytes, guards against stray protocols
//! 2      version     u8 = 1
//! 3      kind        u8              1 = TCP stream, 2 = UDP flow (see [`Kind`])
//! 4      target_len  u8              1..=253
//! 5      target      target_len bytes, the service name (ASCII a-z 0-9 . - _)
//! ..     port        u16             app port on the peer, 0 = its default app
//! ..     deadline_ms u32             remaining deadline, 0 = none
//! ..     ext_len     u16             ..=MAX_EXT_LEN
//! ..     ext         ext_len bytes, reserved for later fields; receivers skip it
//! ```
//! Response:
//! ```text
//! 0      version     u8 = 1
//! 1      status      u8              see [`Status`]
//! 2      msg_len     u8
//! 3      msg         msg_len bytes of UTF-8 text for humans (logs)
//! ```

use bytes::{BufMut, Bytes, BytesMut};

pub const MAGIC: [u8; 2] = *b"WL";
pub const VERSION: u8 = 1;
pub const KIND_TCP: u8 = 1;
/// A UDP flow: the stream carries no bytes after the preamble exchange; the
/// flow's datagrams travel as QUIC DATAGRAM frames named by the stream's
/// quarter stream ID ([`crate::datagram`]). Added after kind 1 with the same
/// layout, so version 1 stays: a sidecar that predates it refuses the
/// stream as malformed (`BadKind(2)`) instead of misreading it.
pub const KIND_UDP: u8 = 2;
/// Longest extension block we accept.
pub const MAX_EXT_LEN: usize = 1024;
/// Longest possible encoded request: bounds what a receiver buffers.
pub const MAX_REQUEST_LEN: usize = 5 + 253 + 2 + 4 + 2 + MAX_EXT_LEN;
/// Longest possible encoded response.
pub const MAX_RESPONSE_LEN: usize = 3 + 255;

/// What a client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub target: String,
    pub port: u16,
    pub deadline_ms: u32,
}

/// What a stream carries after its preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Bytes of one TCP connection, both ways.
    Tcp = KIND_TCP,
    /// Nothing: it stands for one UDP flow, whose datagrams go beside it.
    Udp = KIND_UDP,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            KIND_TCP => Some(Kind::Tcp),
            KIND_UDP => Some(Kind::Udp),
            _ => None,
        }
    }
}

/// The server's answer, sent before any payload byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    UnknownTarget = 1,
    Unauthorized = 2,
    ConnectFailed = 3,
    Malformed = 4,
    Overloaded = 5,
}

impl Status {
    fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::UnknownTarget,
            2 => Status::Unauthorized,
            3 => Status::ConnectFailed,
            4 => Status::Malformed,
            5 => Status::Overloaded,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub message: String,
}

/// Why bytes are not a valid preamble.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// More bytes are needed; `needed` is a lower bound on the total length.
    #[error("incomplete preamble: need at least {needed} bytes")]
    Incomplete { needed: usize },
    #[error("not a weft-l4 preamble (bad magic)")]
    BadMagic,
    #[error("unsupported preamble version {0} (this sidecar speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown stream kind {0}")]
    BadKind(u8),
    #[error("target name must be 1..=253 bytes of a-z 0-9 . - _")]
    BadTarget,
    #[error("extension block of {0} bytes exceeds {MAX_EXT_LEN}")]
    ExtTooLong(usize),
    #[error("unknown response status {0}")]
    BadStatus(u8),
    #[error("response message is not UTF-8")]
    BadMessage,
}

fn valid_target(t: &[u8]) -> bool {
    !t.is_empty()
        && t.len() <= 253
        && t.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
        })
}

impl Request {
    /// Encode a TCP stream request; fails only if the target name is invalid.
    pub fn encode(&self) -> Result<Bytes, DecodeError> {
        self.encode_kind(Kind::Tcp)
    }

    /// Encode a request of any kind; fails only if the target name is invalid.
    pub fn encode_kind(&self, kind: Kind) -> Result<Bytes, DecodeError> {
        if !valid_target(self.target.as_bytes()) {
            return Err(DecodeError::BadTarget);
        }
        let mut b = BytesMut::with_capacity(16 + self.target.len());
        b.put_slice(&MAGIC);
        b.put_u8(VERSION);
        b.put_u8(kind as u8);
        b.put_u8(self.target.len() as u8);
        b.put_slice(self.target.as_bytes());
        b.put_u16(self.port);
        b.put_u32(self.deadline_ms);
        b.put_u16(0);
        Ok(b.freeze())
    }

    /// Decode a TCP stream request from the start of `buf`; on success also
    /// returns how many bytes were used. Any other kind is `BadKind`.
    pub fn decode(buf: &[u8]) -> Result<(Request, usize), DecodeError> {
        match Request::decode_kind(buf)? {
            (Kind::Tcp, req, used) => Ok((req, used)),
            (kind, _, _) => Err(DecodeError::BadKind(kind as u8)),
        }
    }

    /// Decode a request of any known kind from the start of `buf`.
    pub fn decode_kind(buf: &[u8]) -> Result<(Kind, Request, usize), DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let magic = r.take(2)?;
        if magic != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::BadVersion(version));
        }
        let kind = r.u8()?;
        let kind = Kind::from_u8(kind).ok_or(DecodeError::BadKind(kind))?;
        let len = r.u8()? as usize;
        let target = r.take(len)?;
        if !valid_target(target) {
            return Err(DecodeError::BadTarget);
        }
        let port = r.u16()?;
        let deadline_ms = r.u32()?;
        let ext_len = r.u16()? as usize;
        if ext_len > MAX_EXT_LEN {
            return Err(DecodeError::ExtTooLong(ext_len));
        }
        r.take(ext_len)?;
        // valid_target admitted ASCII only, so this conversion cannot lose data.
        let target = String::from_utf8_lossy(target).into_owned();
        Ok((
            kind,
            Request {
                target,
                port,
                deadline_ms,
            },
            r.pos,
        ))
    }
}

impl Response {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Response {
            status,
            message: message.into(),
        }
    }

    pub fn encode(&self) -> Bytes {
        // Truncate on a char boundary so the message stays valid UTF-8.
        let mut end = self.message.len().min(255);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let msg = &self.message.as_bytes()[..end];
        let mut b = BytesMut::with_capacity(3 + msg.len());
        b.put_u8(VERSION);
        b.put_u8(self.status as u8);
        b.put_u8(msg.len() as u8);
        b.put_slice(msg);
        b.freeze()
    }

    pub fn decode(buf: &[u8]) -> Result<(Response, usize), DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::BadVersion(version));
        }
        let status = r.u8()?;
        let status = Status::from_u8(status).ok_or(DecodeError::BadStatus(status))?;
        let len = r.u8()? as usize;
        let msg = r.take(len)?;
        let message = std::str::from_utf8(msg)
            .map_err(|_| DecodeError::BadMessage)?
            .to_string();
        Ok((Response { status, message }, r.pos))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos + n;
        match self.buf.get(self.pos..end) {
            Some(s) => {
                self.pos = end;
                Ok(s)
            }
            None => Err(DecodeError::Incomplete { needed: end }),
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn req() -> Request {
        Request {
            target: "echo.default".into(),
            port: 7000,
            deadline_ms: 1500,
        }
    }

    #[test]
    fn request_round_trips_with_trailing_payload() {
        let mut bytes = req().encode().unwrap().to_vec();
        let len = bytes.len();
        bytes.extend_from_slice(b"payload");
        assert_eq!(Request::decode(&bytes), Ok((req(), len)));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let bytes = req().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(
                matches!(Request::decode(&bytes[..n]), Err(DecodeError::Incomplete { needed }) if needed > n),
                "prefix {n}"
            );
        }
        let resp = Response::new(Status::Unauthorized, "nope").encode();
        for n in 0..resp.len() {
            assert!(matches!(
                Response::decode(&resp[..n]),
                Err(DecodeError::Incomplete { .. })
            ));
        }
    }

    #[test]
    fn rejects_bad_fields() {
        let good = req().encode().unwrap().to_vec();
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Request::decode(&b), Err(DecodeError::BadMagic));
        let mut b = good.clone();
        b[2] = 9;
        assert_eq!(Request::decode(&b), Err(DecodeError::BadVersion(9)));
        let mut b = good.clone();
        b[3] = 7;
        assert_eq!(Request::decode(&b), Err(DecodeError::BadKind(7)));
        let mut b = good.clone();
        b[5] = b'/';
        assert_eq!(Request::decode(&b), Err(DecodeError::BadTarget));
        let mut b = good.clone();
        b[4] = 0;
        assert_eq!(Request::decode(&b), Err(DecodeError::BadTarget));
        let n = good.len();
        let mut b = good.clone();
        b[n - 2..].copy_from_slice(&5000u16.to_be_bytes());
        assert_eq!(Request::decode(&b), Err(DecodeError::ExtTooLong(5000)));
        assert!(Request {
            target: "Bad Name".into(),
            port: 0,
            deadline_ms: 0
        }
        .encode()
        .is_err());
    }

    #[test]
    fn udp_kind_round_trips_and_tcp_decode_refuses_it() {
        let tcp = req().encode().unwrap();
        // The TCP encoding is what it always was: kind byte 1.
        assert_eq!(tcp[3], KIND_TCP);
        assert_eq!(
            Request::decode_kind(&tcp),
            Ok((Kind::Tcp, req(), tcp.len()))
        );
        let udp = req().encode_kind(Kind::Udp).unwrap();
        assert_eq!(udp[3], KIND_UDP);
        assert_eq!(&udp[..3], &tcp[..3]);
        assert_eq!(&udp[4..], &tcp[4..]);
        assert_eq!(
            Request::decode_kind(&udp),
            Ok((Kind::Udp, req(), udp.len()))
        );
        // A receiver that only knows TCP streams refuses a flow cleanly.
        assert_eq!(Request::decode(&udp), Err(DecodeError::BadKind(KIND_UDP)));
        let mut b = udp.to_vec();
        b[3] = 3;
        assert_eq!(Request::decode_kind(&b), Err(DecodeError::BadKind(3)));
    }

    #[test]
    fn extension_block_is_skipped() {
        let mut b = req().encode().unwrap().to_vec();
        let n = b.len();
        b[n - 2..].copy_from_slice(&3u16.to_be_bytes());
        b.extend_from_slice(&[1, 2, 3, 0xAA]);
        assert_eq!(Request::decode(&b), Ok((req(), n + 3)));
    }

    #[test]
    fn response_round_trips_and_truncates_on_char_boundary() {
        let r = Response::new(Status::ConnectFailed, "é".repeat(200));
        let enc = r.encode();
        let (dec, used) = Response::decode(&enc).unwrap();
        assert_eq!(used, enc.len());
        assert_eq!(dec.status, Status::ConnectFailed);
        assert!(dec.message.len() <= 255 && dec.message.chars().all(|c| c == 'é'));
        assert_eq!(
            Response::decode(&[1, 42, 0]),
            Err(DecodeError::BadStatus(42))
        );
        assert_eq!(
            Response::decode(&[1, 0, 1, 0xFF]),
            Err(DecodeError::BadMessage)
        );
    }

    /// Random and mutated inputs never panic and never claim more bytes than given.
    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let good = req().encode().unwrap().to_vec();
        for i in 0..200_000 {
            let buf: Vec<u8> = if i % 2 == 0 {
                let len = rng.random_range(0..64);
                (0..len).map(|_| rng.random()).collect()
            } else {
                let mut b = good.clone();
                let flips = rng.random_range(1..4);
                for _ in 0..flips {
                    let at = rng.random_range(0..b.len());
                    b[at] = rng.random();
                }
                b.truncate(rng.random_range(0..=b.len()));
                b
            };
            if let Ok((_, used)) = Request::decode(&buf) {
                assert!(used <= buf.len());
            }
            if let Ok((_, _, used)) = Request::decode_kind(&buf) {
                assert!(used <= buf.len());
            }
            if let Ok((_, used)) = Response::decode(&buf) {
                assert!(used <= buf.len());
            }
        }
    }
}
