//! W3C trace context (`traceparent`, version 00): the proxy continues the caller's trace with
//! a span of its own, or starts a new (sampled) trace when there is no valid header.

use rand::RngCore;

use super::SpanContext;

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
const LEN: usize = 55;

const FLAG_SAMPLED: u8 = 0x01;

/// The proxy's span for a request carrying `traceparent` (None or invalid → a new trace).
/// The sampled flag follows the caller; new traces are sampled.
pub fn incoming(traceparent: Option<&str>) -> SpanContext {
    match traceparent.and_then(parse) {
        Some(parent) => SpanContext {
            trace_id: parent.trace_id,
            span_id: new_span_id(),
            parent_span_id: Some(parent.span_id),
            sampled: parent.flags & FLAG_SAMPLED != 0,
        },
        None => SpanContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent_span_id: None,
            sampled: true,
        },
    }
}

/// A parsed `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// Strict version-00 parsing: exact length, lowercase hex, non-zero ids.
pub fn parse(s: &str) -> Option<TraceParent> {
    let s = s.trim_matches(|c| c == ' ' || c == '\t');
    let b = s.as_bytes();
    if b.len() != LEN || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version: [u8; 1] = hex(&b[0..2])?;
    if version[0] != 0 {
        return None;
    }
    let trace_id: [u8; 16] = hex(&b[3..35])?;
    let span_id: [u8; 8] = hex(&b[36..52])?;
    let [flags] = hex::<1>(&b[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        span_id,
        flags,
    })
}

fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Lowercase only, as the spec requires.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
}

fn new_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    while id == [0; 16] {
        rand::rng().fill_bytes(&mut id);
    }
    id
}

fn new_span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    while id == [0; 8] {
        rand::rng().fill_bytes(&mut id);
    }
    id
}

impl SpanContext {
    /// The header to send upstream: this span as the parent.
    pub fn traceparent(&self) -> String {
        let flags = if self.sampled { FLAG_SAMPLED } else { 0 };
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.span_id);
        s.push('-');
        push_hex(&mut s, &[flags]);
        s
    }

    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        to_hex(&self.span_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn parse_table() {
        let ok = format!("00-{TRACE}-{SPAN}-01");
        let cases: Vec<(String, Option<u8>)> = vec![
            (ok.clone(), Some(1)),
            (format!("00-{TRACE}-{SPAN}-00"), Some(0)),
            // Unknown flag bits are kept (only bit 0 is interpreted).
            (format!("00-{TRACE}-{SPAN}-09"), Some(9)),
            // Surrounding optional whitespace is allowed by the header grammar.
            (format!(" {ok}\t"), Some(1)),
            // Version other than 00, and the forbidden ff.
            (format!("01-{TRACE}-{SPAN}-01"), None),
            (format!("ff-{TRACE}-{SPAN}-01"), None),
            // Length: short trace id, long span id, trailing data on version 00.
            (format!("00-{}-{SPAN}-01", &TRACE[1..]), None),
            (format!("00-{TRACE}-{SPAN}a-01"), None),
            (format!("{ok}-extra"), None),
            // Uppercase hex is invalid.
            (format!("00-{}-{SPAN}-01", TRACE.to_uppercase()), None),
            (format!("00-{TRACE}-{}-01", SPAN.to_uppercase()), None),
            (format!("00-{TRACE}-{SPAN}-0A"), None),
            // All-zero ids.
            (format!("00-{}-{SPAN}-01", "0".repeat(32)), None),
            (format!("00-{TRACE}-{}-01", "0".repeat(16)), None),
            // Wrong separators and non-hex.
            (format!("00_{TRACE}-{SPAN}-01"), None),
            (format!("00-{}g-{SPAN}-01", &TRACE[..31]), None),
            (String::new(), None),
        ];
        for (input, want) in cases {
            let got = parse(&input);
            assert_eq!(got.map(|p| p.flags), want, "traceparent {input:?}");
            if let Some(p) = got {
                assert_eq!(to_hex(&p.trace_id), TRACE);
                assert_eq!(to_hex(&p.span_id), SPAN);
            }
        }
    }

    #[test]
    fn continues_a_valid_trace() {
        let ctx = incoming(Some(&format!("00-{TRACE}-{SPAN}-01")));
        assert_eq!(ctx.trace_id_hex(), TRACE);
        assert_eq!(
            ctx.parent_span_id.map(|s| to_hex(&s)).as_deref(),
            Some(SPAN)
        );
        assert_ne!(ctx.span_id_hex(), SPAN);
        assert_ne!(ctx.span_id, [0; 8]);
        assert!(ctx.sampled);
        let tp = ctx.traceparent();
        assert_eq!(tp, format!("00-{TRACE}-{}-01", ctx.span_id_hex()));
        assert_eq!(parse(&tp).unwrap().span_id, ctx.span_id);

        let unsampled = incoming(Some(&format!("00-{TRACE}-{SPAN}-00")));
        assert!(!unsampled.sampled);
        assert!(unsampled.traceparent().ends_with("-00"));
    }

    #[test]
    fn starts_a_sampled_trace_when_missing_or_invalid() {
        for header in [
            None,
            Some("garbage"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        ] {
            let a = incoming(header);
            let b = incoming(header);
            assert!(a.sampled);
            assert_eq!(a.parent_span_id, None);
            assert_ne!(a.trace_id, [0; 16]);
            assert_ne!(a.trace_id, b.trace_id, "random trace ids");
            assert!(parse(&a.traceparent()).is_some());
        }
    }
}
