//! SPIFFE ID parsing: never panics; a parsed ID prints back as its input
//! and re-parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_transport::spiffe::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(id.as_str(), text);
        let again = SpiffeId::parse(id.as_str()).expect("re-parses");
        assert_eq!(again, id);
        assert!(id.as_str().starts_with("spiffe://"));
        assert!(!id.trust_domain().is_empty());
        // In its own trust domain it is accepted exactly when it names a
        // workload (has a path).
        let inside = SpiffeId::parse_in(text, id.trust_domain());
        assert_eq!(inside.is_ok(), !id.path().is_empty(), "{text:?}");
    }
});
