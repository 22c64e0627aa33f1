//! The L4 stream preamble, both directions, of every kind (TCP stream, UDP
//! flow), and the UDP flow datagram header: decoding never panics, and
//! whatever decodes re-encodes to what it was decoded from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_transport::datagram;
use weft_transport::preamble::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok((req, used)) = Request::decode(data) {
        assert!(used <= data.len());
        let again = req.encode().expect("a decoded request re-encodes");
        let (back, n) = Request::decode(&again).expect("re-decodes");
        assert_eq!(back, req);
        assert_eq!(n, again.len());
    }
    if let Ok((kind, req, used)) = Request::decode_kind(data) {
        assert!(used <= data.len());
        let again = req.encode_kind(kind).expect("a decoded request re-encodes");
        assert_eq!(Request::decode_kind(&again), Ok((kind, req, again.len())));
    }
    if let Ok(d) = datagram::decode(data) {
        assert!(d.payload.len() <= data.len());
        let again = datagram::encode(d.quarter_stream_id, d.payload);
        let back = datagram::decode(&again).expect("re-decodes");
        assert_eq!(
            (back.quarter_stream_id, back.payload),
            (d.quarter_stream_id, d.payload)
        );
    }
    if let Ok((resp, used)) = Response::decode(data) {
        assert!(used <= data.len());
        let again = resp.encode();
        let (back, n) = Response::decode(&again).expect("re-decodes");
        assert_eq!(back, resp);
        assert_eq!(n, again.len());
    }
});
