//! What HBONE carries besides bytes, parsed and written by us (fuzzed: `fuzz/fuzz_targets/
//! hbone_headers.rs`): the CONNECT `:authority` (an `ip:port`; ztunnel also accepts a
//! hostname from gateways, which Comb does not serve), `forwarded` (RFC 7239 `for=`) and
//! `baggage` (W3C, the workload facts ztunnel puts there).

use std::net::{IpAddr, SocketAddr};

use comb_model::l7::Workload;

/// The destination a CONNECT names: `ip:port` or `[ipv6]:port`, port not 0. Anything else
/// (a name, no port, userinfo, trailing junk) is a bad request.
pub fn parse_authority(authority: &str) -> Option<SocketAddr> {
    if authority.len() > 64 {
        return None;
    }
    let addr: SocketAddr = authority.parse().ok()?;
    (addr.port() != 0).then_some(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// `for=<ip>` (IPv6 quoted and bracketed, RFC 7239 §6).
pub fn forwarded_for(src: IpAddr) -> String {
    match src {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The first `for=` address of a `forwarded` header (informational: the tunnel's source is
/// the connection's peer address, never a header).
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?;
    for pair in first.split(';') {
        let (k, v) = pair.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("for") {
            continue;
        }
        let v = v.trim().trim_matches('"');
        let v = v
            .strip_prefix('[')
            .map_or(v, |r| r.split(']').next().unwrap_or(r));
        return v
            .parse()
            .ok()
            .or_else(|| v.parse::<SocketAddr>().ok().map(|a| a.ip()));
    }
    None
}

/// The workload facts ztunnel sends in `baggage` (W3C baggage, OpenTelemetry names).
pub fn baggage(w: &Workload, cluster: &str) -> String {
    format!(
        "k8s.cluster.name={cluster},k8s.namespace.name={},k8s.deployment.name={},service.name={},service.version={}",
        w.namespace, w.workload, w.canonical_service, w.canonical_revision
    )
}

/// Baggage entries as (key, value), whitespace trimmed, properties (`;...`) dropped; at most
/// 64 entries.
pub fn parse_baggage(value: &str) -> Vec<(&str, &str)> {
    value
        .split(',')
        .filter_map(|member| {
            let kv = member.split(';').next()?;
            let (k, v) = kv.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty()).then_some((k, v))
        })
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority() {
        assert_eq!(
            parse_authority("198.18.2.2:8080"),
            Some("198.18.2.2:8080".parse().unwrap())
        );
        assert_eq!(
            parse_authority("[fd00::1]:80"),
            Some("[fd00::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_authority("[::ffff:198.18.2.2]:80"),
            Some("198.18.2.2:80".parse().unwrap()),
            "a mapped address is its IPv4 address"
        );
        for bad in [
            "",
            "198.18.2.2",
            "198.18.2.2:0",
            "web.shop:80",
            "fd00::1:80",
            "198.18.2.2:80/x",
            "u@198.18.2.2:80",
            "198.18.2.2:99999",
        ] {
            assert_eq!(parse_authority(bad), None, "{bad}");
        }
    }

    #[test]
    fn forwarded() {
        let v4: IpAddr = "198.18.1.2".parse().unwrap();
        let v6: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(forwarded_for(v4), "for=198.18.1.2");
        assert_eq!(forwarded_for(v6), "for=\"[fd00::2]\"");
        assert_eq!(parse_forwarded_for(&forwarded_for(v4)), Some(v4));
        assert_eq!(parse_forwarded_for(&forwarded_for(v6)), Some(v6));
        assert_eq!(
            parse_forwarded_for("proto=tcp;For=\"198.18.1.2:4000\", for=1.1.1.1"),
            Some(v4)
        );
        assert_eq!(parse_forwarded_for("for=unknown"), None);
        assert_eq!(parse_forwarded_for(""), None);
    }

    #[test]
    fn baggage_round_trip() {
        let b = "k8s.cluster.name=c, k8s.namespace.name=shop;p=1,junk,=x,service.name=web";
        assert_eq!(
            parse_baggage(b),
            [
                ("k8s.cluster.name", "c"),
                ("k8s.namespace.name", "shop"),
                ("service.name", "web")
            ]
        );
    }
}
