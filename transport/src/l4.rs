//! Reading L4 preambles off a QUIC stream: just the preamble, never a byte of
//! the payload behind it (reads are sized by what the decoder still needs).

use crate::preamble::{self, DecodeError};

/// Why a preamble could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the stream: {0}")]
    Stream(#[from] quinn::ReadError),
    #[error("stream ended inside the preamble (truncated)")]
    Truncated,
    #[error(transparent)]
    Malformed(DecodeError),
}

/// Read one request preamble.
pub async fn read_request(recv: &mut quinn::RecvStream) -> Result<preamble::Request, ReadError> {
    read_decoded(recv, preamble::MAX_REQUEST_LEN, preamble::Request::decode).await
}

/// Read one request preamble of any kind (TCP stream or UDP flow).
pub async fn read_request_kind(
    recv: &mut quinn::RecvStream,
) -> Result<(preamble::Kind, preamble::Request), ReadError> {
    read_decoded(recv, preamble::MAX_REQUEST_LEN, |buf| {
        preamble::Request::decode_kind(buf).map(|(kind, req, used)| ((kind, req), used))
    })
    .await
}

/// The RFC 9297 quarter stream ID of a UDP flow's stream: the stream ID
/// divided by four. Flow streams are client-initiated bidirectional ones,
/// whose IDs are multiples of four, so this is the stream's index.
pub fn quarter_stream_id(id: quinn::StreamId) -> u64 {
    id.index()
}

/// Read one response preamble.
pub async fn read_response(recv: &mut quinn::RecvStream) -> Result<preamble::Response, ReadError> {
    read_decoded(recv, preamble::MAX_RESPONSE_LEN, preamble::Response::decode).await
}

/// A pure preamble decoder: the value and the bytes it used.
type Decoder<T> = fn(&[u8]) -> Result<(T, usize), DecodeError>;

async fn read_decoded<T>(
    recv: &mut quinn::RecvStream,
    max: usize,
    decode: Decoder<T>,
) -> Result<T, ReadError> {
    let mut buf = Vec::with_capacity(64);
    loop {
        match decode(&buf) {
            Ok((value, _)) => return Ok(value),
            Err(DecodeError::Incomplete { needed }) => {
                let start = buf.len();
                // The decoder never asks for more than `max` from a valid
                // preamble; stop a peer from making us buffer more.
                if start >= max {
                    return Err(ReadError::Malformed(DecodeError::Incomplete { needed }));
                }
                buf.resize(needed.min(max), 0);
                let n = recv
                    .read(&mut buf[start..])
                    .await?
                    .ok_or(ReadError::Truncated)?;
                buf.truncate(start + n);
            }
            Err(e) => return Err(ReadError::Malformed(e)),
        }
    }
}
