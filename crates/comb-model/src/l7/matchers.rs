//! Istio string matchers (exact, `prefix*`, `*suffix`, `*`), hosts and paths, split into
//! their form once when a policy is compiled so a request only compares bytes.

use std::net::IpAddr;

use ipnet::IpNet;

/// What a lone `*` means for a field: Istio turns it into a present match for headers and
/// hosts, and into the regex `.+` (a value is required) for principals, namespaces, paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Star {
    Present,
    NonEmpty,
}

/// One Istio string pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    /// `*` for a field where any present value matches.
    Present,
    /// `*` for a field where Istio requires a non-empty value.
    NonEmpty,
}

impl StrMatch {
    /// Istio's order (`StringMatcherWithPrefix`, `HeaderMatcher`): `*` alone, then a leading
    /// `*` (suffix match), then a trailing `*` (prefix match), else exact.
    pub(crate) fn new(pattern: &str, star: Star) -> Self {
        if pattern == "*" {
            match star {
                Star::Present => StrMatch::Present,
                Star::NonEmpty => StrMatch::NonEmpty,
            }
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StrMatch::Suffix(suffix.into())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StrMatch::Prefix(prefix.into())
        } else {
            StrMatch::Exact(pattern.into())
        }
    }

    /// Case-sensitive match.
    pub(crate) fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(p) => v == &**p,
            StrMatch::Prefix(p) => v.starts_with(&**p),
            StrMatch::Suffix(p) => v.ends_with(&**p),
            StrMatch::Present => true,
            StrMatch::NonEmpty => !v.is_empty(),
        }
    }

    /// ASCII case-insensitive match (hosts).
    fn matches_ci(&self, v: &str) -> bool {
        let (v, eq) = (v.as_bytes(), <[u8]>::eq_ignore_ascii_case);
        match self {
            StrMatch::Exact(p) => eq(v, p.as_bytes()),
            StrMatch::Prefix(p) => v.get(..p.len()).is_some_and(|h| eq(h, p.as_bytes())),
            StrMatch::Suffix(p) => v
                .len()
                .checked_sub(p.len())
                .and_then(|start| v.get(start..))
                .is_some_and(|t| eq(t, p.as_bytes())),
            StrMatch::Present => true,
            StrMatch::NonEmpty => !v.is_empty(),
        }
    }
}

/// Compiles a list of patterns.
pub(crate) fn patterns(list: &[String], star: Star) -> Vec<StrMatch> {
    list.iter().map(|p| StrMatch::new(p, star)).collect()
}

/// Does any pattern match? A missing value (no principal, no header) matches none.
pub(crate) fn any_str(list: &[StrMatch], v: Option<&str>) -> bool {
    v.is_some_and(|v| list.iter().any(|m| m.matches(v)))
}

/// A `hosts` entry: case-insensitive, the request's `:port` ignored unless the pattern
/// names one (Istio appends `(:[0-9]+)?` to the host regex).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostMatch {
    pattern: StrMatch,
    with_port: bool,
}

impl HostMatch {
    pub(crate) fn new(pattern: &str) -> Self {
        let lower = pattern.to_ascii_lowercase();
        HostMatch {
            with_port: split_port(&lower).1.is_some(),
            pattern: StrMatch::new(&lower, Star::Present),
        }
    }

    /// `bare`: `host` without its `:port` (split once per request by the caller).
    pub(crate) fn matches(&self, host: &str, bare: &str) -> bool {
        self.pattern
            .matches_ci(if self.with_port { host } else { bare })
    }
}

pub(crate) fn hosts(list: &[String]) -> Vec<HostMatch> {
    list.iter().map(|h| HostMatch::new(h)).collect()
}

/// `host:port` → (`host`, Some(port)); a bracketed IPv6 literal keeps its brackets; a bare
/// IPv6 address (several colons, no brackets) has no port.
pub(crate) fn split_port(host: &str) -> (&str, Option<&str>) {
    let Some(i) = host.rfind(':') else {
        return (host, None);
    };
    let (name, port) = (&host[..i], &host[i + 1..]);
    let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    let plain = !name.contains(':') || (name.starts_with('[') && name.ends_with(']'));
    if digits && plain {
        (name, Some(port))
    } else {
        (host, None)
    }
}

/// The path part of a request target: whatever follows `?` is the query, never the path.
pub(crate) fn path_only(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// Istio's `ipBlocks` and IP condition values: a CIDR or one address (the L4 compiler's
/// reading, so both layers agree).
pub(crate) use crate::policy_compile::select::parse_net;

pub(crate) fn in_nets(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_forms() {
        let m = |p: &str, v: &str| StrMatch::new(p, Star::NonEmpty).matches(v);
        assert!(m("abc", "abc"));
        assert!(!m("abc", "abcd"));
        assert!(!m("abc", "ABC"), "case-sensitive");
        assert!(m("ab*", "abcd"));
        assert!(m("ab*", "ab"));
        assert!(!m("ab*", "a"));
        assert!(m("*cd", "abcd"));
        assert!(!m("*cd", "abc"));
        assert!(m("*", "x"));
        assert!(!m("*", ""), "a lone * needs a value here");
        assert!(StrMatch::new("*", Star::Present).matches(""));
        // A leading * wins, as in Istio: `*a*` is a suffix match of `a*`.
        assert!(m("*a*", "xa*"));
        assert!(!m("*a*", "xab"));
        assert!(!any_str(&patterns(&["*".into()], Star::Present), None));
    }

    #[test]
    fn host_forms() {
        let h = |p: &str, v: &str| HostMatch::new(p).matches(v, split_port(v).0);
        assert!(h("Example.COM", "example.com"));
        assert!(h("example.com", "EXAMPLE.com:8080"), "port ignored");
        assert!(h("example.com:8080", "example.com:8080"));
        assert!(!h("example.com:8080", "example.com"));
        assert!(!h("example.com:8080", "example.com:9090"));
        assert!(h("*.example.com", "a.b.Example.com:80"));
        assert!(!h("*.example.com", "example.com"));
        assert!(h("example.*", "example.org"));
        assert!(!h("example.*", "www.example.org"));
        assert!(h("*", ""));
        assert!(h("[::1]", "[::1]:80"));
        assert!(h("é.com", "é.com"), "non-ASCII bytes compare exactly");
        assert!(!h("longer-than-host.com", "a.com"));
        assert!(!h("*.longer-than-host.com", "a.com"));
    }

    #[test]
    fn ports_split_off() {
        assert_eq!(split_port("a:80"), ("a", Some("80")));
        assert_eq!(split_port("a"), ("a", None));
        assert_eq!(split_port("a:"), ("a:", None));
        assert_eq!(split_port("a:x"), ("a:x", None));
        assert_eq!(split_port("[::1]:443"), ("[::1]", Some("443")));
        assert_eq!(split_port("[::1]"), ("[::1]", None));
        assert_eq!(split_port("::1"), ("::1", None));
        assert_eq!(path_only("/a?b=c?d"), "/a");
        assert_eq!(path_only("/a"), "/a");
    }

    #[test]
    fn nets() {
        assert_eq!(parse_net("10.1.2.3/8"), Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(parse_net("::1"), Some("::1/128".parse().unwrap()));
        assert_eq!(parse_net("x"), None);
        let n = [parse_net("10.0.0.0/8").unwrap()];
        assert!(in_nets(&n, "10.9.9.9".parse().unwrap()));
        assert!(!in_nets(&n, "11.0.0.1".parse().unwrap()));
    }
}
