//! Conformance table for [`Authz::evaluate`]: Istio's AuthorizationPolicy semantics, one case
//! per row (policies in a compact text form, a request, the expected decision).

use std::borrow::Cow;
use std::net::IpAddr;

use super::*;
use crate::l7::{Authenticated, Headers, Workload};
use crate::policy::AuthzCondition;

/// Policies as text: `ACTION [ns/]name: RULE || RULE ...`; no text after `:` = no rules;
/// `{}` = one empty rule. A rule is `;`-separated clauses: `from FIELD=v,v ...` (one source),
/// `to FIELD=v,v ...` (one operation), `when KEY values=v,v notValues=v,v`.
fn policy(text: &str) -> AuthorizationPolicy {
    let (head, rules) = text.split_once(':').expect("ACTION name: rules");
    let (action, name) = head.split_once(' ').expect("ACTION name");
    let action = match action {
        "ALLOW" => AuthzAction::Allow,
        "DENY" => AuthzAction::Deny,
        "AUDIT" => AuthzAction::Audit,
        other => panic!("action {other}"),
    };
    let key = match name.split_once('/') {
        Some((ns, n)) => ObjKey::new(ns, n),
        None => ObjKey::new("shop", name),
    };
    let rules = rules
        .split("||")
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(rule)
        .collect();
    AuthorizationPolicy {
        key,
        selector: None,
        action,
        rules,
    }
}

fn rule(text: &str) -> AuthzRule {
    let mut r = AuthzRule::default();
    for clause in text.split(';').map(str::trim).filter(|c| *c != "{}") {
        let mut words = clause.split_whitespace();
        let kind = words.next().expect("clause kind");
        let fields: Vec<(&str, Vec<String>)> = words
            .map(|w| {
                let (f, v) = w.split_once('=').unwrap_or((w, ""));
                (f, v.split(',').map(str::to_owned).collect())
            })
            .collect();
        match kind {
            "from" => {
                let mut s = AuthzSource::default();
                for (f, v) in fields {
                    let nets = || v.iter().map(|n| parse_net(n).expect(n)).collect();
                    match f {
                        "principals" => s.principals = v,
                        "notPrincipals" => s.not_principals = v,
                        "namespaces" => s.namespaces = v,
                        "notNamespaces" => s.not_namespaces = v,
                        "ipBlocks" => s.ip_blocks = nets(),
                        "notIpBlocks" => s.not_ip_blocks = nets(),
                        "remoteIpBlocks" => s.remote_ip_blocks = nets(),
                        "notRemoteIpBlocks" => s.not_remote_ip_blocks = nets(),
                        "requestPrincipals" => s.request_principals = v,
                        "notRequestPrincipals" => s.not_request_principals = v,
                        other => panic!("source field {other}"),
                    }
                }
                r.from.push(s);
            }
            "to" => {
                let mut o = AuthzOperation::default();
                for (f, v) in fields {
                    let ports = || v.iter().map(|p| p.parse().expect(p)).collect();
                    match f {
                        "ports" => o.ports = ports(),
                        "notPorts" => o.not_ports = ports(),
                        "hosts" => o.hosts = v,
                        "notHosts" => o.not_hosts = v,
                        "methods" => o.methods = v,
                        "notMethods" => o.not_methods = v,
                        "paths" => o.paths = v,
                        "notPaths" => o.not_paths = v,
                        other => panic!("operation field {other}"),
                    }
                }
                r.to.push(o);
            }
            "when" => {
                let mut it = fields.into_iter();
                let (key, _) = it.next().expect("when KEY");
                let mut c = AuthzCondition {
                    key: key.into(),
                    ..Default::default()
                };
                for (f, v) in it {
                    match f {
                        "values" => c.values = v,
                        "notValues" => c.not_values = v,
                        other => panic!("condition field {other}"),
                    }
                }
                r.when.push(c);
            }
            other => panic!("clause {other}"),
        }
    }
    r
}

/// Request headers as a client sent them: names in any case, repeated names allowed.
struct TestHeaders(Vec<(&'static str, &'static str)>);

impl Headers for TestHeaders {
    fn header(&self, lowercase_name: &str) -> Option<Cow<'_, str>> {
        let mut vals = self
            .0
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(lowercase_name))
            .map(|(_, v)| *v);
        let first = vals.next()?;
        let rest: Vec<&str> = vals.collect();
        if rest.is_empty() {
            Some(Cow::Borrowed(first))
        } else {
            Some(Cow::Owned(
                [first]
                    .into_iter()
                    .chain(rest)
                    .collect::<Vec<_>>()
                    .join(","),
            ))
        }
    }
}

/// A request: from `source` (ns/sa of a known pod, or "" for an unknown peer) at
/// `source_ip`, to `dst` (ip:port); `http` None = opaque TCP.
struct Req {
    source: &'static str,
    source_ip: &'static str,
    dst: &'static str,
    /// (host, method, path)
    http: Option<(&'static str, &'static str, &'static str)>,
    headers: Vec<(&'static str, &'static str)>,
}

fn http(method: &'static str, host: &'static str, path: &'static str) -> Req {
    Req {
        source: "shop/web",
        source_ip: "10.0.1.5",
        dst: "10.0.2.7:8080",
        http: Some((host, method, path)),
        headers: vec![],
    }
}

fn get(path: &'static str) -> Req {
    http("GET", "api.shop.svc.cluster.local:8080", path)
}

fn tcp() -> Req {
    Req {
        http: None,
        ..get("/")
    }
}

impl Req {
    fn from(mut self, source: &'static str) -> Self {
        self.source = source;
        self
    }
    fn ip(mut self, ip: &'static str) -> Self {
        self.source_ip = ip;
        self
    }
    fn to(mut self, dst: &'static str) -> Self {
        self.dst = dst;
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }
}

fn workload(source: &str) -> Option<Workload> {
    let (ns, sa) = source.split_once('/')?;
    Some(Workload {
        pod: ObjKey::new(ns, "client-0"),
        workload: "client".into(),
        namespace: ns.into(),
        service_account: sa.into(),
        principal: format!("cluster.local/ns/{ns}/sa/{sa}"),
        canonical_service: "client".into(),
        canonical_revision: "latest".into(),
        identity: 300,
    })
}

fn evaluate(policies: &[&str], r: &Req) -> Decision {
    let aps: Vec<AuthorizationPolicy> = policies.iter().map(|p| policy(p)).collect();
    let authz = Authz::new(&aps);
    let w = workload(r.source);
    let headers = TestHeaders(r.headers.clone());
    let (dst_ip, dst_port) = r.dst.rsplit_once(':').expect("ip:port");
    let req = Request {
        source_ip: r.source_ip.parse().expect("source ip"),
        source: w.as_ref(),
        authenticated: None,
        destination_ip: dst_ip
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .expect("destination ip"),
        destination_port: dst_port.parse().expect("port"),
        http: r.http.map(|(host, method, path)| HttpRequest {
            host,
            method,
            path,
            headers: &headers,
        }),
    };
    let d = authz.evaluate(&req);
    assert_eq!(d, authz.evaluate_ref(&req).to_owned());
    d
}

use DecisionReason::{Allowed, Denied, NoAllowMatched, NoPolicy};

/// Expected: allow, reason, deciding policy, audit policy (names in namespace shop unless
/// given as ns/name).
type Want = (
    bool,
    DecisionReason,
    Option<&'static str>,
    Option<&'static str>,
);

fn key(name: &str) -> ObjKey {
    match name.split_once('/') {
        Some((ns, n)) => ObjKey::new(ns, n),
        None => ObjKey::new("shop", name),
    }
}

#[track_caller]
fn check(cases: &[(&str, &[&str], Req, Want)]) {
    for (name, policies, req, (allow, reason, pol, audit)) in cases {
        let got = evaluate(policies, req);
        let want = Decision {
            allow: *allow,
            reason: *reason,
            policy: pol.map(key),
            audit: audit.map(key),
        };
        assert_eq!(got, want, "case {name:?}: {policies:?}");
        assert_eq!(
            got.allow,
            !matches!(got.reason, Denied | NoAllowMatched),
            "{name}"
        );
    }
}

#[test]
fn order_deny_allow_audit() {
    let allow_all = "ALLOW allow-all: {}";
    let deny_get = "DENY deny-get: to methods=GET";
    let audit_get = "AUDIT audit-get: to methods=GET";
    check(&[
        ("no policy", &[], get("/"), (true, NoPolicy, None, None)),
        (
            "allow all",
            &[allow_all],
            get("/"),
            (true, Allowed, Some("allow-all"), None),
        ),
        (
            "deny before allow",
            &[allow_all, deny_get],
            get("/"),
            (false, Denied, Some("deny-get"), None),
        ),
        (
            "deny not matching, allow decides",
            &[allow_all, deny_get],
            http("POST", "x", "/"),
            (true, Allowed, Some("allow-all"), None),
        ),
        (
            "only deny policies, none matching",
            &[deny_get],
            http("PUT", "x", "/"),
            (true, NoPolicy, None, None),
        ),
        (
            "allow policy without rules allows nothing",
            &["ALLOW nothing:"],
            get("/"),
            (false, NoAllowMatched, Some("nothing"), None),
        ),
        (
            "no allow rule matches: the first allow policy by namespace/name",
            &[
                "ALLOW z: to paths=/z",
                "ALLOW b: to paths=/b",
                "ALLOW istio-system/root: to paths=/r",
            ],
            get("/"),
            (false, NoAllowMatched, Some("istio-system/root"), None),
        ),
        (
            "a root-namespace allow counts like any other",
            &[
                "ALLOW istio-system/root: to paths=/r",
                "ALLOW local: to paths=/l",
            ],
            get("/r"),
            (true, Allowed, Some("istio-system/root"), None),
        ),
        (
            "the first matching allow policy decides",
            &["ALLOW b: {}", "ALLOW a: {}"],
            get("/"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "audit only marks",
            &[audit_get],
            get("/"),
            (true, NoPolicy, None, Some("audit-get")),
        ),
        (
            "audit marks a denied request too",
            &[audit_get, deny_get, allow_all],
            get("/"),
            (false, Denied, Some("deny-get"), Some("audit-get")),
        ),
        (
            "audit not matching",
            &[audit_get, allow_all],
            http("POST", "x", "/"),
            (true, Allowed, Some("allow-all"), None),
        ),
        (
            "audit with HTTP fields never marks opaque TCP",
            &[audit_get],
            tcp(),
            (true, NoPolicy, None, None),
        ),
        (
            "audit with L4 fields marks opaque TCP",
            &["AUDIT audit-port: to ports=8080"],
            tcp(),
            (true, NoPolicy, None, Some("audit-port")),
        ),
        (
            "deny in the root namespace",
            &["DENY istio-system/no-ops: from namespaces=ops", allow_all],
            get("/").from("ops/admin"),
            (false, Denied, Some("istio-system/no-ops"), None),
        ),
    ]);
}

#[test]
fn rule_structure_and_sources() {
    check(&[
        (
            "any from matches",
            &["ALLOW a: from namespaces=ops ; from namespaces=shop"],
            get("/"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "every field of a source must match",
            &["ALLOW a: from namespaces=shop principals=cluster.local/ns/shop/sa/other"],
            get("/"),
            (false, NoAllowMatched, Some("a"), None),
        ),
        (
            "from and to must both match",
            &["ALLOW a: from namespaces=shop ; to ports=9090"],
            get("/"),
            (false, NoAllowMatched, Some("a"), None),
        ),
        (
            "every when must hold",
            &["ALLOW a: when source.namespace values=shop ; when destination.port values=9090"],
            get("/"),
            (false, NoAllowMatched, Some("a"), None),
        ),
        (
            "any rule of a policy",
            &["ALLOW a: to ports=1 || to ports=8080"],
            get("/"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "principal exact",
            &["ALLOW a: from principals=cluster.local/ns/shop/sa/web"],
            get("/"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "principal prefix",
            &["ALLOW a: from principals=cluster.local/ns/shop/*"],
            get("/"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "principal suffix",
            &["ALLOW a: from principals=*/sa/web"],
            get("/").from("ops/web"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "principal * needs a workload",
            &["ALLOW a: from principals=*"],
            get("/").from(""),
            (false, NoAllowMatched, Some("a"), None),
        ),
        (
            "namespace * matches any workload",
            &["ALLOW a: from namespaces=*"],
            get("/").from("ops/x"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "notPrincipals excludes",
            &["ALLOW a: from notPrincipals=*/sa/web"],
            get("/"),
            (false, NoAllowMatched, Some("a"), None),
        ),
        (
            "notPrincipals holds without a workload",
            &["ALLOW a: from notPrincipals=*"],
            get("/").from(""),
            (true, Allowed, Some("a"), None),
        ),
        (
            "notNamespaces excludes",
            &["DENY d: from notNamespaces=shop,istio-system"],
            get("/").from("ops/x"),
            (false, Denied, Some("d"), None),
        ),
        (
            "notNamespaces lets the listed ones through",
            &["DENY d: from notNamespaces=shop"],
            get("/"),
            (true, NoPolicy, None, None),
        ),
        (
            "ipBlocks",
            &["ALLOW a: from ipBlocks=10.0.1.0/24"],
            get("/"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "ipBlocks single address, other peer",
            &["ALLOW a: from ipBlocks=10.0.1.6"],
            get("/"),
            (false, NoAllowMatched, Some("a"), None),
        ),
        (
            "notIpBlocks",
            &["DENY d: from notIpBlocks=10.0.0.0/16"],
            get("/").ip("192.0.2.1").from(""),
            (false, Denied, Some("d"), None),
        ),
        (
            "remoteIpBlocks is the source address (no proxy in front)",
            &["ALLOW a: from remoteIpBlocks=10.0.1.5/32"],
            get("/"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "notRemoteIpBlocks",
            &["ALLOW a: from notRemoteIpBlocks=10.0.1.5"],
            get("/"),
            (false, NoAllowMatched, Some("a"), None),
        ),
        (
            "IPv4-mapped IPv6 peer matches IPv4 blocks",
            &["ALLOW a: from ipBlocks=10.0.1.0/24"],
            get("/").ip("::ffff:10.0.1.5"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "IPv6 blocks",
            &["ALLOW a: from ipBlocks=fd00::/64"],
            get("/").ip("fd00::5").to("[fd00::7]:8080"),
            (true, Allowed, Some("a"), None),
        ),
        (
            "requestPrincipals never match (no JWT)",
            &["ALLOW a: from requestPrincipals=*"],
            get("/"),
            (false, NoAllowMatched, Some("a"), None),
        ),
        (
            "notRequestPrincipals always hold",
            &["ALLOW a: from notRequestPrincipals=issuer/sub"],
            get("/"),
            (true, Allowed, Some("a"), None),
        ),
    ]);
}

#[test]
fn operations() {
    let allowed = (true, Allowed, Some("a"), None);
    let refused = (false, NoAllowMatched, Some("a"), None);
    check(&[
        ("ports", &["ALLOW a: to ports=80,8080"], get("/"), allowed),
        (
            "notPorts",
            &["ALLOW a: to notPorts=8080"],
            get("/"),
            refused,
        ),
        (
            "notPorts other",
            &["ALLOW a: to notPorts=80"],
            get("/"),
            allowed,
        ),
        (
            "method exact",
            &["ALLOW a: to methods=GET,HEAD"],
            get("/"),
            allowed,
        ),
        (
            "method case-sensitive",
            &["ALLOW a: to methods=get"],
            get("/"),
            refused,
        ),
        (
            "notMethods",
            &["ALLOW a: to notMethods=GET"],
            get("/"),
            refused,
        ),
        (
            "notMethods other",
            &["ALLOW a: to notMethods=DELETE"],
            get("/"),
            allowed,
        ),
        (
            "path exact",
            &["ALLOW a: to paths=/api"],
            get("/api"),
            allowed,
        ),
        (
            "path exact, longer",
            &["ALLOW a: to paths=/api"],
            get("/api/x"),
            refused,
        ),
        (
            "path prefix",
            &["ALLOW a: to paths=/api/*"],
            get("/api/v1/x"),
            allowed,
        ),
        (
            "path prefix needs the slash",
            &["ALLOW a: to paths=/api/*"],
            get("/apix"),
            refused,
        ),
        (
            "path prefix matches its own root",
            &["ALLOW a: to paths=/api/*"],
            get("/api/"),
            allowed,
        ),
        (
            "path suffix",
            &["ALLOW a: to paths=*.png"],
            get("/img/a.png"),
            allowed,
        ),
        (
            "path suffix other",
            &["ALLOW a: to paths=*.png"],
            get("/img/a.jpg"),
            refused,
        ),
        (
            "path *",
            &["ALLOW a: to paths=*"],
            get("/anything"),
            allowed,
        ),
        (
            "query excluded",
            &["ALLOW a: to paths=/api"],
            get("/api?x=/y"),
            allowed,
        ),
        (
            "query excluded, suffix",
            &["ALLOW a: to paths=*.png"],
            get("/a?f=.png"),
            refused,
        ),
        (
            "notPaths",
            &["ALLOW a: to notPaths=/admin/*"],
            get("/admin/x"),
            refused,
        ),
        (
            "notPaths other",
            &["ALLOW a: to notPaths=/admin/*"],
            get("/public"),
            allowed,
        ),
        (
            "host exact, port ignored",
            &["ALLOW a: to hosts=api.shop.svc.cluster.local"],
            get("/"),
            allowed,
        ),
        (
            "host case-insensitive",
            &["ALLOW a: to hosts=API.Shop.SVC.cluster.local"],
            get("/"),
            allowed,
        ),
        (
            "host with port",
            &["ALLOW a: to hosts=api.shop.svc.cluster.local:8080"],
            get("/"),
            allowed,
        ),
        (
            "host with other port",
            &["ALLOW a: to hosts=api.shop.svc.cluster.local:80"],
            get("/"),
            refused,
        ),
        (
            "host pattern port, none sent",
            &["ALLOW a: to hosts=api:8080"],
            http("GET", "api", "/"),
            refused,
        ),
        (
            "host suffix",
            &["ALLOW a: to hosts=*.svc.cluster.local"],
            get("/"),
            allowed,
        ),
        (
            "host suffix other",
            &["ALLOW a: to hosts=*.example.com"],
            get("/"),
            refused,
        ),
        (
            "host prefix",
            &["ALLOW a: to hosts=api.*"],
            get("/"),
            allowed,
        ),
        (
            "host prefix other",
            &["ALLOW a: to hosts=web.*"],
            get("/"),
            refused,
        ),
        ("host *", &["ALLOW a: to hosts=*"], get("/"), allowed),
        (
            "notHosts",
            &["ALLOW a: to notHosts=*.cluster.local"],
            get("/"),
            refused,
        ),
        (
            "notHosts other",
            &["ALLOW a: to notHosts=evil.com"],
            get("/"),
            allowed,
        ),
        (
            "IPv6 host literal with port",
            &["ALLOW a: to hosts=[fd00::7]"],
            http("GET", "[fd00::7]:8080", "/"),
            allowed,
        ),
        (
            "every field of an operation",
            &["ALLOW a: to methods=GET paths=/x ports=8080"],
            get("/y"),
            refused,
        ),
        (
            "any operation",
            &["ALLOW a: to paths=/x ; to paths=/y"],
            get("/y"),
            allowed,
        ),
    ]);
}

#[test]
fn conditions() {
    let allowed = (true, Allowed, Some("a"), None);
    let refused = (false, NoAllowMatched, Some("a"), None);
    let hdr = "ALLOW a: when request.headers[X-User] values=alice,bob*";
    let not_hdr = "ALLOW a: when request.headers[x-user] notValues=mallory";
    check(&[
        (
            "header value",
            &[hdr],
            get("/").header("x-user", "alice"),
            allowed,
        ),
        (
            "header name case-insensitive",
            &[hdr],
            get("/").header("X-USER", "alice"),
            allowed,
        ),
        (
            "header prefix",
            &[hdr],
            get("/").header("x-user", "bobby"),
            allowed,
        ),
        (
            "header value case-sensitive",
            &[hdr],
            get("/").header("x-user", "Alice"),
            refused,
        ),
        ("header absent: values fail", &[hdr], get("/"), refused),
        (
            "header absent: notValues hold",
            &[not_hdr],
            get("/"),
            allowed,
        ),
        (
            "header notValues",
            &[not_hdr],
            get("/").header("x-user", "mallory"),
            refused,
        ),
        (
            "multiple header values are joined with ','",
            &["ALLOW a: when request.headers[x-a] values=1,2"],
            get("/").header("x-a", "1").header("x-a", "2"),
            refused,
        ),
        (
            "joined values match as one string",
            &["ALLOW a: when request.headers[x-a] values=1*"],
            get("/").header("x-a", "1").header("x-a", "2"),
            allowed,
        ),
        (
            "header suffix on joined values",
            &["ALLOW a: when request.headers[x-a] values=*,2"],
            get("/").header("x-a", "1").header("x-a", "2"),
            allowed,
        ),
        (
            "header * = present, even empty",
            &["ALLOW a: when request.headers[x-a] values=*"],
            get("/").header("x-a", ""),
            allowed,
        ),
        (
            "header * absent",
            &["ALLOW a: when request.headers[x-a] values=*"],
            get("/"),
            refused,
        ),
        (
            "values and notValues together",
            &["ALLOW a: when request.headers[x-a] values=a* notValues=ab"],
            get("/").header("x-a", "ab"),
            refused,
        ),
        (
            "source.namespace",
            &["ALLOW a: when source.namespace values=shop"],
            get("/"),
            allowed,
        ),
        (
            "source.namespace notValues without a workload",
            &["ALLOW a: when source.namespace notValues=shop"],
            get("/").from(""),
            allowed,
        ),
        (
            "source.namespace values without a workload",
            &["ALLOW a: when source.namespace values=*"],
            get("/").from(""),
            refused,
        ),
        (
            "source.principal prefix",
            &["ALLOW a: when source.principal values=cluster.local/ns/shop/*"],
            get("/"),
            allowed,
        ),
        (
            "source.principal notValues",
            &["ALLOW a: when source.principal notValues=*/sa/web"],
            get("/"),
            refused,
        ),
        (
            "source.ip",
            &["ALLOW a: when source.ip values=10.0.1.0/24"],
            get("/"),
            allowed,
        ),
        (
            "remote.ip",
            &["ALLOW a: when remote.ip values=10.0.1.5"],
            get("/"),
            allowed,
        ),
        (
            "source.ip notValues",
            &["ALLOW a: when source.ip notValues=10.0.0.0/8"],
            get("/"),
            refused,
        ),
        (
            "destination.ip",
            &["ALLOW a: when destination.ip values=10.0.2.7"],
            get("/"),
            allowed,
        ),
        (
            "destination.ip other",
            &["ALLOW a: when destination.ip values=10.0.3.0/24"],
            get("/"),
            refused,
        ),
        (
            "destination.port",
            &["ALLOW a: when destination.port values=80,8080"],
            get("/"),
            allowed,
        ),
        (
            "destination.port notValues",
            &["ALLOW a: when destination.port notValues=8080"],
            get("/"),
            refused,
        ),
        (
            "request.auth.* values never match",
            &["ALLOW a: when request.auth.claims[iss] values=*"],
            get("/"),
            refused,
        ),
        (
            "request.auth.* notValues always hold",
            &["ALLOW a: when request.auth.principal notValues=x"],
            get("/"),
            allowed,
        ),
        (
            "connection.sni absent",
            &["ALLOW a: when connection.sni values=*"],
            get("/"),
            refused,
        ),
        (
            "connection.sni notValues",
            &["ALLOW a: when connection.sni notValues=x"],
            get("/"),
            allowed,
        ),
        (
            "experimental keys absent",
            &["ALLOW a: when experimental.envoy.filters.a[b] values=c"],
            get("/"),
            refused,
        ),
    ]);
}

#[test]
fn opaque_tcp() {
    let refused = (false, NoAllowMatched, Some("a"), None);
    let denied = (false, Denied, Some("d"), None);
    let passes = (true, NoPolicy, None, None);
    check(&[
        (
            "allow on L4 fields",
            &["ALLOW a: from namespaces=shop ; to ports=8080"],
            tcp(),
            (true, Allowed, Some("a"), None),
        ),
        (
            "allow with methods never matches",
            &["ALLOW a: to methods=GET ports=8080"],
            tcp(),
            refused,
        ),
        (
            "allow with notPaths never matches",
            &["ALLOW a: to notPaths=/admin"],
            tcp(),
            refused,
        ),
        (
            "allow with hosts never matches",
            &["ALLOW a: to hosts=*"],
            tcp(),
            refused,
        ),
        (
            "allow with a header condition never matches",
            &["ALLOW a: when request.headers[x] notValues=y"],
            tcp(),
            refused,
        ),
        (
            "allow with request principals never matches",
            &["ALLOW a: from notRequestPrincipals=x"],
            tcp(),
            refused,
        ),
        (
            "only the HTTP rule is skipped",
            &["ALLOW a: to methods=GET || to ports=8080"],
            tcp(),
            (true, Allowed, Some("a"), None),
        ),
        (
            "deny ignores methods: denies the port",
            &["DENY d: to methods=GET ports=8080"],
            tcp(),
            denied,
        ),
        (
            "deny ignores methods, other port",
            &["DENY d: to methods=GET ports=9090"],
            tcp(),
            passes,
        ),
        (
            "deny with only methods denies all TCP",
            &["DENY d: to methods=GET"],
            tcp(),
            denied,
        ),
        (
            "deny ignores notPaths",
            &["DENY d: to notPaths=/x"],
            tcp(),
            denied,
        ),
        (
            "deny ignores notHosts",
            &["DENY d: to notHosts=* ports=8080"],
            tcp(),
            denied,
        ),
        (
            "deny ignores header conditions",
            &["DENY d: when request.headers[x] values=y"],
            tcp(),
            denied,
        ),
        (
            "deny ignores request.auth",
            &["DENY d: when request.auth.principal values=y ; from namespaces=shop"],
            tcp(),
            denied,
        ),
        (
            "deny ignores request principals",
            &["DENY d: from requestPrincipals=* namespaces=ops"],
            tcp(),
            passes,
        ),
        (
            "deny keeps L4 conditions",
            &["DENY d: to methods=GET ; when source.namespace values=ops"],
            tcp(),
            passes,
        ),
        (
            "deny keeps destination.ip",
            &["DENY d: when destination.ip values=10.0.2.7"],
            tcp(),
            denied,
        ),
        (
            "deny keeps connection.sni (absent)",
            &["DENY d: when connection.sni values=*"],
            tcp(),
            passes,
        ),
        (
            "the same deny over HTTP needs the method",
            &["DENY d: to methods=GET ports=8080"],
            http("POST", "x", "/"),
            passes,
        ),
    ]);
}

#[test]
fn is_empty_and_panic_free_on_odd_input() {
    assert!(Authz::default().is_empty());
    assert!(Authz::new(&[] as &[AuthorizationPolicy]).is_empty());
    assert!(!Authz::new(&[policy("AUDIT a: {}")]).is_empty());
    let policies = [
        "DENY d: to hosts=*.x:1,a*,[::1] notPaths=*,/a/* ; when request.headers[] values=*",
        "ALLOW a: from principals=*,x* notNamespaces=*y ; to paths=*.z,/ notMethods=*",
        "ALLOW b: when destination.port values=80 ; when source.ip notValues=10.0.0.0/8",
        "AUDIT c: when request.headers[x] values=a*,*b notValues=*",
    ];
    let authz = Authz::new(&policies.iter().map(|p| policy(p)).collect::<Vec<_>>());
    let odd = [
        "",
        ":",
        "::",
        "[",
        "]:",
        "[::1",
        "a:99999999999999999999",
        "é:80",
        "*",
        "?",
        "a?b",
        ":80",
        "\u{0}",
        "ÿÿÿ.x:1",
        "x.",
    ];
    let headers = TestHeaders(vec![("x", "é"), ("", "")]);
    let w = workload("a/b");
    for (i, s) in odd.iter().enumerate() {
        for t in odd {
            for source in [None, w.as_ref()] {
                let req = Request {
                    source_ip: "::".parse::<IpAddr>().unwrap(),
                    source,
                    authenticated: None,
                    destination_ip: "0.0.0.0".parse().unwrap(),
                    destination_port: (i as u16).wrapping_mul(9000),
                    http: Some(HttpRequest {
                        host: s,
                        method: t,
                        path: t,
                        headers: &headers,
                    }),
                };
                let _ = authz.evaluate(&req);
            }
        }
    }
}

/// A certificate's identity (HBONE) is what principals and namespaces match, not the one
/// the source address would suggest.
#[test]
fn authenticated_identity_overrides_the_address() {
    let aps = [policy(
        "ALLOW a: from principals=cluster.local/ns/a/sa/client",
    )];
    let authz = Authz::new(&aps);
    // The address belongs to shop/web; the certificate says a/client.
    let w = workload("shop/web");
    let req = |auth: Option<Authenticated<'static>>| Request {
        source_ip: "198.18.1.2".parse().unwrap(),
        source: w.as_ref(),
        authenticated: auth,
        destination_ip: "198.18.2.2".parse().unwrap(),
        destination_port: 80,
        http: None,
    };
    assert!(!authz.evaluate(&req(None)).allow);
    let client = Authenticated {
        principal: "cluster.local/ns/a/sa/client",
        namespace: "a",
    };
    assert!(authz.evaluate(&req(Some(client))).allow);
    let other = Authenticated {
        principal: "cluster.local/ns/a/sa/other",
        namespace: "a",
    };
    assert!(!authz.evaluate(&req(Some(other))).allow);
    let ns = [policy("ALLOW a: from namespaces=a")];
    assert!(Authz::new(&ns).evaluate(&req(Some(other))).allow);
}
