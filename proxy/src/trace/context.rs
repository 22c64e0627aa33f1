//! Trace context on the wire, with no I/O: W3C Trace Context
//! (`traceparent`, `tracestate`) and B3 (the single `b3` header and the
//! multi-header `x-b3-*` form). [`extract`] reads what an app or a peer
//! sent; [`inject`] writes our span as the parent for the next hop, in
//! `traceparent` always and in whichever B3 forms the request came with.
//!
//! Malformed values are ignored (the W3C spec says to restart the trace
//! rather than fail the request), never an error the caller sees.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const B3: &str = "b3";
pub const B3_TRACE_ID: &str = "x-b3-traceid";
pub const B3_SPAN_ID: &str = "x-b3-spanid";
pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const B3_SAMPLED: &str = "x-b3-sampled";
pub const B3_FLAGS: &str = "x-b3-flags";

/// Every trace header an app should copy from the request it serves to the
/// requests it makes, so its calls continue the trace.
pub const PROPAGATED: &[&str] = &[
    TRACEPARENT,
    TRACESTATE,
    B3,
    B3_TRACE_ID,
    B3_SPAN_ID,
    B3_PARENT_SPAN_ID,
    B3_SAMPLED,
    B3_FLAGS,
];

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// Where a trace continues from: the caller's trace and span, and whether
/// the trace is sampled (`None`: B3's "no decision yet", ours to make).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: Option<bool>,
}

/// Which header forms a request carried, so the answer uses the same ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    pub w3c: bool,
    pub b3_single: bool,
    pub b3_multi: bool,
}

/// What a request says about its trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The caller's span, if any header form gave a valid one.
    pub parent: Option<Parent>,
    /// A sampling decision without a trace (`b3: 0`, or `x-b3-sampled`
    /// alone): honoured for the new trace we start.
    pub sampled_only: Option<bool>,
    pub formats: Formats,
    /// The parent came from a valid `traceparent`, so `tracestate` belongs
    /// to it (W3C: otherwise `tracestate` must not be used).
    pub w3c_parent: bool,
}

/// What to send to the next hop: the trace, our span as its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// B3 carries the parent of the span it names; W3C does not.
    pub parent_span_id: Option<SpanId>,
    pub sampled: bool,
}

/// Read the trace context of a request. `traceparent` wins over B3 when
/// both are present and valid (it is what sidecars send each other); an
/// invalid `traceparent` falls back to B3.
pub fn extract(headers: &HeaderMap) -> Extracted {
    let mut out = Extracted::default();
    let one = |name: &str| -> Option<&str> {
        // A repeated field is ambiguous: the spec says to ignore it.
        let mut all = headers.get_all(name).iter();
        let first = all.next()?;
        if all.next().is_some() {
            return None;
        }
        first.to_str().ok()
    };
    let w3c = one(TRACEPARENT).and_then(parse_traceparent);
    let single = one(B3).map(parse_b3_single);
    let multi = parse_b3_multi(
        one(B3_TRACE_ID),
        one(B3_SPAN_ID),
        one(B3_SAMPLED),
        one(B3_FLAGS),
    );
    out.formats = Formats {
        w3c: headers.contains_key(TRACEPARENT),
        b3_single: headers.contains_key(B3),
        b3_multi: [
            B3_TRACE_ID,
            B3_SPAN_ID,
            B3_PARENT_SPAN_ID,
            B3_SAMPLED,
            B3_FLAGS,
        ]
        .iter()
        .any(|h| headers.contains_key(*h)),
    };
    let b3 = match single {
        Some(Some(B3Value::Context(p))) => Some(p),
        _ => match multi {
            Some(B3Value::Context(p)) => Some(p),
            _ => None,
        },
    };
    out.w3c_parent = w3c.is_some();
    out.parent = w3c.or(b3);
    if out.parent.is_none() {
        out.sampled_only = match (single, multi) {
            (Some(Some(B3Value::Decision(d))), _) | (_, Some(B3Value::Decision(d))) => Some(d),
            _ => None,
        };
    }
    out
}

/// Set the headers the next hop reads: `traceparent` (our span as the
/// parent), and the B3 forms in `formats` with the same trace. `tracestate`
/// travels unchanged (we add no entry of our own); the caller drops it when
/// the trace did not come from `traceparent`. Stale B3 fields of a
/// form not in `formats` are left alone: the request did not carry them.
pub fn inject(headers: &mut HeaderMap, out: &Outgoing, formats: Formats) {
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    set(TRACEPARENT, format_traceparent(out));
    if formats.b3_single {
        set(B3, format_b3_single(out));
    }
    if formats.b3_multi {
        set(B3_TRACE_ID, hex(&out.trace_id));
        set(B3_SPAN_ID, hex(&out.span_id));
        set(B3_SAMPLED, if out.sampled { "1" } else { "0" }.into());
        match out.parent_span_id {
            Some(p) => set(B3_PARENT_SPAN_ID, hex(&p)),
            None => {
                headers.remove(B3_PARENT_SPAN_ID);
            }
        }
        // The debug flag implies sampled; we express the decision in
        // x-b3-sampled instead, and must not send both (B3 spec).
        headers.remove(B3_FLAGS);
    }
}

/// `version-traceid-parentid-flags`, e.g.
/// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
pub fn parse_traceparent(v: &str) -> Option<Parent> {
    let v = v.trim_matches([' ', '\t']);
    let mut parts = v.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more
    // (the spec says to parse the first four and ignore the rest).
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if flags.len() != 2 || !is_lower_hex(flags) {
        return None;
    }
    let trace_id = parse_id::<16>(trace)?;
    let span_id = parse_id::<8>(span)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Parent {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
    })
}

pub fn format_traceparent(o: &Outgoing) -> String {
    format!(
        "00-{}-{}-{}",
        hex(&o.trace_id),
        hex(&o.span_id),
        if o.sampled { "01" } else { "00" }
    )
}

/// What a B3 header gave: a context, or only a sampling decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum B3Value {
    Context(Parent),
    Decision(bool),
}

/// `b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]`, or `b3: {sampling}`
/// alone; sampling is `1`, `0` or `d` (debug, implies sampled).
pub fn parse_b3_single(v: &str) -> Option<B3Value> {
    let v = v.trim();
    let parts: Vec<&str> = v.split('-').collect();
    let sampling = |s: &str| match s {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    };
    match parts.as_slice() {
        [s] => sampling(s).map(B3Value::Decision),
        [t, s, rest @ ..] if rest.len() <= 2 => {
            let sampled = match rest.first() {
                Some(x) => Some(sampling(x)?),
                None => None,
            };
            if let Some(p) = rest.get(1) {
                parse_id::<8>(p)?;
            }
            Some(B3Value::Context(Parent {
                trace_id: parse_b3_trace_id(t)?,
                span_id: parse_id::<8>(s)?,
                sampled,
            }))
        }
        _ => None,
    }
}

pub fn format_b3_single(o: &Outgoing) -> String {
    let mut s = format!(
        "{}-{}-{}",
        hex(&o.trace_id),
        hex(&o.span_id),
        if o.sampled { "1" } else { "0" }
    );
    if let Some(p) = o.parent_span_id {
        s.push('-');
        s.push_str(&hex(&p));
    }
    s
}

/// The `x-b3-*` headers: trace and span ID together, or a lone sampling
/// decision (`x-b3-sampled: 0|1|true|false`, `x-b3-flags: 1` = debug).
pub fn parse_b3_multi(
    trace: Option<&str>,
    span: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<B3Value> {
    let debug = flags.map(str::trim) == Some("1");
    let decision = match sampled.map(str::trim) {
        _ if debug => Some(true),
        Some("1") | Some("true") => Some(true),
        Some("0") | Some("false") => Some(false),
        _ => None,
    };
    match (trace, span) {
        (Some(t), Some(s)) => match (parse_b3_trace_id(t.trim()), parse_id::<8>(s.trim())) {
            (Some(trace_id), Some(span_id)) => Some(B3Value::Context(Parent {
                trace_id,
                span_id,
                sampled: decision,
            })),
            _ => None,
        },
        (None, None) => decision.map(B3Value::Decision),
        _ => None,
    }
}

/// B3 trace IDs are 128-bit (32 hex) or the older 64-bit (16 hex), which
/// W3C and OTLP see left-padded with zeros.
fn parse_b3_trace_id(s: &str) -> Option<TraceId> {
    match s.len() {
        32 => parse_id::<16>(s),
        16 => {
            let low = parse_id::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

/// Exactly `2*N` lower-case hex digits, not all zero (zero IDs are invalid
/// in both W3C and B3).
fn parse_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !is_lower_hex(s) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    if out.iter().all(|b| *b == 0) {
        return None;
    }
    Some(out)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lower-case hex, as every format here writes IDs.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACE: TraceId = [
        0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47,
        0x36,
    ];
    const SPAN: SpanId = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn traceparent_round_trips() {
        let p = parse_traceparent(TP).unwrap();
        assert_eq!(p.trace_id, TRACE);
        assert_eq!(p.span_id, SPAN);
        assert_eq!(p.sampled, Some(true));
        let o = Outgoing {
            trace_id: p.trace_id,
            span_id: p.span_id,
            parent_span_id: None,
            sampled: true,
        };
        assert_eq!(format_traceparent(&o), TP);
        let unsampled = parse_traceparent(&TP.replace("-01", "-00")).unwrap();
        assert_eq!(unsampled.sampled, Some(false));
        // Other flag bits are not the sampled bit.
        let other = parse_traceparent(&TP.replace("-01", "-02")).unwrap();
        assert_eq!(other.sampled, Some(false));
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bé-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // A future version may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn b3_single_forms() {
        let ctx = |sampled| {
            Some(B3Value::Context(Parent {
                trace_id: TRACE,
                span_id: SPAN,
                sampled,
            }))
        };
        let t = "4bf92f3577b34da6a3ce929d0e0e4736";
        let s = "00f067aa0ba902b7";
        assert_eq!(parse_b3_single(&format!("{t}-{s}")), ctx(None));
        assert_eq!(parse_b3_single(&format!("{t}-{s}-1")), ctx(Some(true)));
        assert_eq!(parse_b3_single(&format!("{t}-{s}-d")), ctx(Some(true)));
        assert_eq!(parse_b3_single(&format!("{t}-{s}-0")), ctx(Some(false)));
        assert_eq!(
            parse_b3_single(&format!("{t}-{s}-1-05e3ac9a4f6e3b90")),
            ctx(Some(true))
        );
        assert_eq!(parse_b3_single("0"), Some(B3Value::Decision(false)));
        assert_eq!(parse_b3_single("d"), Some(B3Value::Decision(true)));
        // 64-bit trace IDs are left-padded.
        let Some(B3Value::Context(p)) = parse_b3_single("a3ce929d0e0e4736-00f067aa0ba902b7-1")
        else {
            panic!("64-bit trace id")
        };
        assert_eq!(p.trace_id[..8], [0; 8]);
        assert_eq!(hex(&p.trace_id[8..]), "a3ce929d0e0e4736");
        for bad in [
            "",
            "x",
            "2",
            t,
            &format!("{t}-{s}-x"),
            &format!("{t}-{s}-1-zz"),
            &format!("{t}-{s}-1-{s}-extra"),
            &format!("{t}-0000000000000000-1"),
            &format!("abc-{s}-1"),
        ] {
            assert_eq!(parse_b3_single(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn b3_multi_forms() {
        let t = Some("4bf92f3577b34da6a3ce929d0e0e4736");
        let s = Some("00f067aa0ba902b7");
        let Some(B3Value::Context(p)) = parse_b3_multi(t, s, Some("1"), None) else {
            panic!()
        };
        assert_eq!(
            (p.trace_id, p.span_id, p.sampled),
            (TRACE, SPAN, Some(true))
        );
        let Some(B3Value::Context(p)) = parse_b3_multi(t, s, Some("0"), Some("1")) else {
            panic!()
        };
        assert_eq!(p.sampled, Some(true), "debug wins");
        let Some(B3Value::Context(p)) = parse_b3_multi(t, s, None, None) else {
            panic!()
        };
        assert_eq!(p.sampled, None);
        assert_eq!(
            parse_b3_multi(None, None, Some("false"), None),
            Some(B3Value::Decision(false))
        );
        assert_eq!(parse_b3_multi(t, None, Some("1"), None), None);
        assert_eq!(parse_b3_multi(t, Some("nothex!!"), Some("1"), None), None);
        assert_eq!(parse_b3_multi(None, None, None, None), None);
    }

    #[test]
    fn extract_prefers_traceparent_and_falls_back_to_b3() {
        let b3 = "a3ce929d0e0e4736a3ce929d0e0e4736-1111111111111111-1";
        let h = headers(&[(TRACEPARENT, TP), (B3, b3)]);
        let e = extract(&h);
        assert_eq!(e.parent.unwrap().trace_id, TRACE);
        assert!(e.formats.w3c && e.formats.b3_single && !e.formats.b3_multi);

        assert!(e.w3c_parent);

        let h = headers(&[(TRACEPARENT, "junk"), (B3, b3)]);
        let e = extract(&h);
        assert_eq!(hex(&e.parent.unwrap().span_id), "1111111111111111");
        assert!(!e.w3c_parent);

        let h = headers(&[
            (B3_TRACE_ID, "4bf92f3577b34da6a3ce929d0e0e4736"),
            (B3_SPAN_ID, "00f067aa0ba902b7"),
            (B3_SAMPLED, "0"),
        ]);
        let e = extract(&h);
        assert_eq!(e.parent.unwrap().sampled, Some(false));
        assert!(e.formats.b3_multi && !e.formats.w3c);

        // A repeated traceparent is ambiguous: ignored.
        let h = headers(&[(TRACEPARENT, TP), (TRACEPARENT, TP)]);
        assert_eq!(extract(&h).parent, None);

        let h = headers(&[(B3, "0")]);
        let e = extract(&h);
        assert_eq!((e.parent, e.sampled_only), (None, Some(false)));

        assert_eq!(extract(&HeaderMap::new()), Extracted::default());
    }

    #[test]
    fn inject_writes_every_form_the_request_used() {
        let o = Outgoing {
            trace_id: TRACE,
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            parent_span_id: Some(SPAN),
            sampled: true,
        };
        let mut h = headers(&[
            (TRACEPARENT, TP),
            (TRACESTATE, "vendor=x"),
            (B3, "0"),
            (B3_TRACE_ID, "a3ce929d0e0e4736"),
            (B3_FLAGS, "1"),
        ]);
        let formats = extract(&h).formats;
        inject(&mut h, &o, formats);
        let get = |n: &str| h.get(n).unwrap().to_str().unwrap().to_string();
        assert_eq!(
            get(TRACEPARENT),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
        assert_eq!(get(TRACESTATE), "vendor=x");
        assert_eq!(
            get(B3),
            "4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-1-00f067aa0ba902b7"
        );
        assert_eq!(get(B3_TRACE_ID), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(get(B3_SPAN_ID), "0102030405060708");
        assert_eq!(get(B3_PARENT_SPAN_ID), "00f067aa0ba902b7");
        assert_eq!(get(B3_SAMPLED), "1");
        assert!(!h.contains_key(B3_FLAGS));
        // What we wrote reads back as our span.
        let back = extract(&h).parent.unwrap();
        assert_eq!((back.trace_id, back.span_id), (TRACE, o.span_id));

        // A request without B3 gets none.
        let mut h = HeaderMap::new();
        inject(&mut h, &o, Formats::default());
        assert_eq!(h.len(), 1);
    }
}
