//! What HBONE parses itself (comb-proxy `hbone::headers`): a CONNECT `:authority`, the
//! `forwarded` and `baggage` headers. Arbitrary text must never panic; an accepted
//! authority must be an address with a port that prints back to something that parses to
//! the same address; `forwarded_for` of any parsed address must parse back to it.
#![no_main]

use comb_proxy::hbone::headers::{forwarded_for, parse_authority, parse_baggage, parse_forwarded_for};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(a) = parse_authority(s) {
        assert_ne!(a.port(), 0);
        assert_eq!(parse_authority(&a.to_string()), Some(a));
        assert_eq!(parse_forwarded_for(&forwarded_for(a.ip())), Some(a.ip()));
    }
    if let Some(ip) = parse_forwarded_for(s) {
        assert_eq!(parse_forwarded_for(&forwarded_for(ip)), Some(ip));
    }
    for (k, v) in parse_baggage(s) {
        assert!(!k.is_empty());
        assert!(!k.contains(',') && !v.contains(','));
    }
});
