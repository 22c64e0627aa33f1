//! The L4 stream preamble, both directions: decoding never panics, and
//! whatever decodes re-encodes to the same bytes it was decoded from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_transport::preamble::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok((req, used)) = Request::decode(data) {
        assert!(used <= data.len());
        let again = req.encode().expect("a decoded request re-encodes");
        let (back, n) = Request::decode(&again).expect("re-decodes");
        assert_eq!(back, req);
        assert_eq!(n, again.len());
    }
    if let Ok((resp, used)) = Response::decode(data) {
        assert!(used <= data.len());
        let again = resp.encode();
        let (back, n) = Response::decode(&again).expect("re-decodes");
        assert_eq!(back, resp);
        assert_eq!(n, again.len());
    }
});
