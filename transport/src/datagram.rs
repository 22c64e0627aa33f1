//! UDP flow datagrams on a `weft-l4` connection: the payload of each QUIC
//! DATAGRAM frame (RFC 9221), laid out as an HTTP Datagram (RFC 9297 §2.1)
//! carrying a UDP proxying payload (RFC 9298 §5):
//!
//! ```text
//! Quarter Stream ID (i)   the flow's stream ID / 4 (client-initiated bidi)
//! Context ID (i)          0 = one UDP payload; other values are dropped
//! UDP Payload (..)        the whole UDP datagram's payload
//! ```
//!
//! `(i)` is a QUIC variable-length integer (RFC 9000 §16). The flow's
//! bidirectional stream (preamble kind [`crate::preamble::Kind::Udp`]) names
//! the target and is authorized once; its quarter stream ID then tells both
//! sidecars which flow a datagram belongs to. Encoding and decoding are pure
//! and total: any input decodes to a value or an error, never a panic.

use bytes::{BufMut, Bytes, BytesMut};

/// RFC 9298 §5: context ID 0 carries a UDP payload.
pub const CONTEXT_UDP: u64 = 0;

/// The largest value a QUIC varint holds (2^62 - 1).
pub const MAX_VARINT: u64 = (1 << 62) - 1;

/// A decoded datagram, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub quarter_stream_id: u64,
    pub context_id: u64,
    pub payload: &'a [u8],
}

/// Why bytes are not a flow datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram ends inside its quarter stream ID or context ID")]
    Truncated,
}

/// Bytes the header of a datagram for `quarter_stream_id` takes (context 0).
pub fn header_len(quarter_stream_id: u64) -> usize {
    varint_len(quarter_stream_id) + varint_len(CONTEXT_UDP)
}

/// The DATAGRAM payload carrying `payload` on flow `quarter_stream_id`.
/// IDs above [`MAX_VARINT`] cannot occur (they come from QUIC stream IDs,
/// which are varints themselves); they are clamped rather than panicking.
pub fn encode(quarter_stream_id: u64, payload: &[u8]) -> Bytes {
    let qsid = quarter_stream_id.min(MAX_VARINT);
    let mut b = BytesMut::with_capacity(header_len(qsid) + payload.len());
    put_varint(&mut b, qsid);
    put_varint(&mut b, CONTEXT_UDP);
    b.put_slice(payload);
    b.freeze()
}

/// Split a DATAGRAM payload into flow, context and UDP payload.
pub fn decode(buf: &[u8]) -> Result<Datagram<'_>, DecodeError> {
    let (quarter_stream_id, a) = get_varint(buf).ok_or(DecodeError::Truncated)?;
    let (context_id, b) = get_varint(&buf[a..]).ok_or(DecodeError::Truncated)?;
    Ok(Datagram {
        quarter_stream_id,
        context_id,
        payload: &buf[a + b..],
    })
}

fn varint_len(v: u64) -> usize {
    match v {
        0..=63 => 1,
        64..=16_383 => 2,
        16_384..=1_073_741_823 => 4,
        _ => 8,
    }
}

fn put_varint(b: &mut BytesMut, v: u64) {
    match varint_len(v) {
        1 => b.put_u8(v as u8),
        2 => b.put_u16(0x4000 | v as u16),
        4 => b.put_u32(0x8000_0000 | v as u32),
        _ => b.put_u64(0xC000_0000_0000_0000 | v),
    }
}

/// A varint at the start of `buf`, and its length.
fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(first & 0x3F);
    for &b in &bytes[1..] {
        v = (v << 8) | u64::from(b);
    }
    Some((v, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn round_trips_at_every_varint_size() {
        for qsid in [
            0,
            1,
            63,
            64,
            16_383,
            16_384,
            1_073_741_823,
            1 << 30,
            MAX_VARINT,
        ] {
            let enc = encode(qsid, b"dns query");
            assert_eq!(enc.len(), header_len(qsid) + 9, "{qsid}");
            let d = decode(&enc).unwrap();
            assert_eq!(
                (d.quarter_stream_id, d.context_id, d.payload),
                (qsid, 0, &b"dns query"[..])
            );
        }
        // Empty UDP payloads are legal datagrams.
        assert_eq!(decode(&encode(5, b"")).unwrap().payload, b"");
    }

    #[test]
    fn matches_rfc_9000_varint_examples() {
        // RFC 9000 §A.1: 0x7bbd is 15293, 0x25 is 37, 0x9d7f3e7d is 494878333.
        assert_eq!(get_varint(&[0x7b, 0xbd]), Some((15_293, 2)));
        assert_eq!(get_varint(&[0x25]), Some((37, 1)));
        assert_eq!(
            get_varint(&[0x9d, 0x7f, 0x3e, 0x7d]),
            Some((494_878_333, 4))
        );
        let enc = encode(15_293, b"");
        assert_eq!(&enc[..], &[0x7b, 0xbd, 0x00]);
    }

    #[test]
    fn truncated_headers_are_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x40]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x01]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x01, 0x80, 0]), Err(DecodeError::Truncated));
        // A nonzero context decodes; the receiver drops it.
        assert_eq!(decode(&[0x01, 0x02, 0xAA]).unwrap().context_id, 2);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xda7a);
        for _ in 0..100_000 {
            let len = rng.random_range(0..24);
            let buf: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if let Ok(d) = decode(&buf) {
                assert!(d.payload.len() <= buf.len());
                let again = encode(d.quarter_stream_id, d.payload);
                if d.context_id == CONTEXT_UDP {
                    assert_eq!(decode(&again).unwrap(), d);
                }
            }
        }
    }
}
