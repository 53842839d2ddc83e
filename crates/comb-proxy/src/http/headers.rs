//! Header handling: the authorization view over an `http::HeaderMap`, hop-by-hop removal, and
//! the few request facts (authority, gRPC) the proxy derives from headers.

use std::borrow::Cow;
use std::net::IpAddr;

use bytes::Bytes;
use comb_model::l7::Headers;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Request headers as AuthorizationPolicy sees them: lowercase names, repeated values joined
/// with `,` (Envoy's view), plus the pseudo headers `:authority`, `:method`, `:path`.
pub struct HeaderView<'a> {
    pub map: &'a HeaderMap,
    pub authority: &'a str,
    pub method: &'a str,
    /// Path and query, as received.
    pub path: &'a str,
}

impl Headers for HeaderView<'_> {
    fn header(&self, lowercase_name: &str) -> Option<Cow<'_, str>> {
        match lowercase_name {
            ":authority" | "host" if !self.authority.is_empty() => {
                return Some(Cow::Borrowed(self.authority));
            }
            ":method" => return Some(Cow::Borrowed(self.method)),
            ":path" => return Some(Cow::Borrowed(self.path)),
            _ => {}
        }
        let mut values = self.map.get_all(lowercase_name).iter();
        let first = values.next()?;
        let Some(second) = values.next() else {
            return Some(value_str(first));
        };
        let mut joined = String::with_capacity(first.len() + second.len() + 1);
        joined.push_str(&value_str(first));
        for v in std::iter::once(second).chain(values) {
            joined.push(',');
            joined.push_str(&value_str(v));
        }
        Some(Cow::Owned(joined))
    }
}

/// Non-UTF-8 bytes (obs-text) shown lossily: a policy cannot name them anyway.
fn value_str(v: &HeaderValue) -> Cow<'_, str> {
    match v.to_str() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(v.as_bytes()),
    }
}

/// `:authority` (HTTP/2, absolute-form HTTP/1) else `Host`, as sent; "" when neither.
pub fn authority<B>(req: &http::Request<B>) -> &str {
    if let Some(a) = req.uri().authority() {
        return a.as_str();
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
}

/// `content-type: application/grpc`, `application/grpc+proto`, ...
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `Connection: upgrade` with an `Upgrade` header (HTTP/1 only).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Envoy's `use_remote_address: true` with `xff_num_trusted_hops: 0` (Istio's gateways with
/// the default `numTrustedProxies`): the downstream peer's address is appended to `x-forwarded-for`
/// (several received header lines are joined first, as Envoy reads them), and
/// `x-forwarded-proto` is `http` (the downstream is plaintext) unless a client sent one: a
/// mesh client is often behind a gateway that terminated TLS, and that fact must survive.
pub fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr) {
    let ip = peer.to_canonical().to_string();
    let mut values = headers.get_all(&X_FORWARDED_FOR).iter();
    // Each buffer becomes the header value as it is (`Bytes` from a `String`/`Vec`: no copy).
    let xff = match (values.next(), values.next()) {
        (None, _) => HeaderValue::from_maybe_shared(Bytes::from(ip)).ok(),
        (Some(first), None) => {
            let mut v = Vec::with_capacity(first.len() + 1 + ip.len());
            v.extend_from_slice(first.as_bytes());
            v.extend_from_slice(b",");
            v.extend_from_slice(ip.as_bytes());
            HeaderValue::from_maybe_shared(Bytes::from(v)).ok()
        }
        (Some(_), Some(_)) => {
            let mut v: Vec<u8> = Vec::new();
            for line in headers.get_all(&X_FORWARDED_FOR) {
                v.extend_from_slice(line.as_bytes());
                v.push(b',');
            }
            v.extend_from_slice(ip.as_bytes());
            HeaderValue::from_maybe_shared(Bytes::from(v)).ok()
        }
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Drops hop-by-hop headers (RFC 9110 7.6.1): `Connection` and what it names,
/// `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding` (hyper frames the body again), `TE`
/// except `trailers` (gRPC needs it), and `Upgrade` unless the exchange is an upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Usually there are none: one pass over the names (no hashing) instead of a lookup per
    // hop-by-hop name, twice per request.
    if !headers.keys().any(|n| {
        n == header::CONNECTION
            || n == header::UPGRADE
            || n == header::TRANSFER_ENCODING
            || n == header::TE
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
    }) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        // Names listed in Connection are hop-by-hop too; collect first (borrow), rarely any.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    if let Some(te) = headers.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_repeated_values_and_strips_hop_by_hop() {
        let mut m = HeaderMap::new();
        m.append("x-a", HeaderValue::from_static("1"));
        m.append("x-a", HeaderValue::from_static("2"));
        m.append("connection", HeaderValue::from_static("close, x-b"));
        m.append("x-b", HeaderValue::from_static("secret"));
        m.append("te", HeaderValue::from_static("trailers"));
        m.append("transfer-encoding", HeaderValue::from_static("chunked"));
        let v = HeaderView {
            map: &m,
            authority: "web:80",
            method: "GET",
            path: "/a?b",
        };
        assert_eq!(v.header("x-a").as_deref(), Some("1,2"));
        assert_eq!(v.header(":authority").as_deref(), Some("web:80"));
        assert_eq!(v.header("x-none"), None);
        strip_hop_by_hop(&mut m, false);
        assert!(m.get("x-b").is_none() && m.get("connection").is_none());
        assert!(m.get("transfer-encoding").is_none());
        assert_eq!(m.get("te").unwrap(), "trailers");
        assert_eq!(m.get_all("x-a").iter().count(), 2);
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped() {
        for name in [
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "transfer-encoding",
            "te",
        ] {
            let mut m = HeaderMap::new();
            m.insert("x-a", HeaderValue::from_static("1"));
            m.insert(name, HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut m, false);
            assert!(m.get(name).is_none(), "{name}");
            assert_eq!(m.len(), 1, "{name}");
        }
        // None there: nothing changes.
        let mut m = HeaderMap::new();
        m.insert("x-a", HeaderValue::from_static("1"));
        m.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut m, false);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn forwarded_headers_append_the_peer() {
        let mut m = HeaderMap::new();
        set_forwarded(&mut m, "10.0.0.7".parse().unwrap());
        assert_eq!(m.get("x-forwarded-for").unwrap(), "10.0.0.7");
        assert_eq!(m.get("x-forwarded-proto").unwrap(), "http");

        let mut m = HeaderMap::new();
        m.append(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, 5.6.7.8"),
        );
        m.append("x-forwarded-for", HeaderValue::from_static("9.9.9.9"));
        m.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        set_forwarded(&mut m, "fd00::5".parse().unwrap());
        let all: Vec<_> = m.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["1.2.3.4, 5.6.7.8,9.9.9.9,fd00::5"]);
        assert_eq!(m.get("x-forwarded-proto").unwrap(), "https");

        // An IPv4 peer on a dual-stack socket is written as IPv4.
        let mut m = HeaderMap::new();
        set_forwarded(&mut m, "::ffff:10.1.2.3".parse().unwrap());
        assert_eq!(m.get("x-forwarded-for").unwrap(), "10.1.2.3");
    }

    #[test]
    fn upgrade_detection() {
        let mut m = HeaderMap::new();
        m.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&m));
        m.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade(&m));
        strip_hop_by_hop(&mut m, true);
        assert_eq!(m.get("upgrade").unwrap(), "websocket");
        assert_eq!(m.get("connection").unwrap(), "upgrade");
    }
}
