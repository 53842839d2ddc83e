//! Compiled AuthorizationPolicy rules of one workload and their evaluation.
//!
//! Compiling splits every pattern into its form once (see [`super::matchers`]), so evaluating
//! a request only compares borrowed bytes: no allocation unless a caller wants an owned
//! [`Decision`] naming a policy (use [`Authz::evaluate_ref`] on hot paths).

use std::net::IpAddr;

use ipnet::IpNet;

use super::matchers::{
    HostMatch, Star, StrMatch, any_str, hosts, in_nets, parse_net, path_only, patterns, split_port,
};
use super::{Decision, DecisionReason, HttpRequest, Request};
use crate::objects::ObjKey;
use crate::policy::{
    AuthorizationPolicy, AuthzAction, AuthzCondition, AuthzOperation, AuthzRule, AuthzSource,
};

/// The AuthorizationPolicies selecting one workload, compiled for per-request evaluation.
#[derive(Clone, Debug, Default)]
pub struct Authz {
    /// Each list by policy namespace/name.
    deny: Vec<Policy>,
    allow: Vec<Policy>,
    audit: Vec<Policy>,
}

/// [`Decision`] borrowing the policy names from the [`Authz`] (no allocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecisionRef<'a> {
    pub allow: bool,
    pub reason: DecisionReason,
    pub policy: Option<&'a ObjKey>,
    pub audit: Option<&'a ObjKey>,
}

impl DecisionRef<'_> {
    pub fn to_owned(&self) -> Decision {
        Decision {
            allow: self.allow,
            reason: self.reason,
            policy: self.policy.cloned(),
            audit: self.audit.cloned(),
        }
    }
}

impl Authz {
    /// Compiles the policies that select one workload (any order; evaluation goes by
    /// namespace/name within each action).
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a AuthorizationPolicy>) -> Self {
        let mut out = Authz::default();
        for ap in policies {
            let p = Policy {
                key: ap.key.clone(),
                rules: ap.rules.iter().map(Rule::new).collect(),
            };
            match ap.action {
                AuthzAction::Deny => out.deny.push(p),
                AuthzAction::Allow => out.allow.push(p),
                AuthzAction::Audit => out.audit.push(p),
            }
        }
        for list in [&mut out.deny, &mut out.allow, &mut out.audit] {
            list.sort_by(|a, b| a.key.cmp(&b.key));
        }
        out
    }

    /// True when no ALLOW, DENY or AUDIT policy selects the workload.
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// True when some rule has a field only an HTTP request has (hosts, methods, paths,
    /// request principals, `request.*`): a connection-level decision may differ from the
    /// per-request one.
    pub fn has_http_rules(&self) -> bool {
        [&self.deny, &self.allow, &self.audit]
            .iter()
            .any(|l| l.iter().any(|p| p.rules.iter().any(|r| r.http_only)))
    }

    /// Istio's order: DENY, then ALLOW; AUDIT marks.
    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        self.evaluate_ref(req).to_owned()
    }

    /// [`Authz::evaluate`] without cloning policy names.
    pub fn evaluate_ref(&self, req: &Request<'_>) -> DecisionRef<'_> {
        let ctx = Ctx::new(req);
        let audit = first_match(&self.audit, &ctx, Mode::Allow);
        let decided = |allow, reason, policy| DecisionRef {
            allow,
            reason,
            policy,
            audit,
        };
        if let Some(p) = first_match(&self.deny, &ctx, Mode::Deny) {
            return decided(false, DecisionReason::Denied, Some(p));
        }
        let Some(first_allow) = self.allow.first() else {
            return decided(true, DecisionReason::NoPolicy, None);
        };
        match first_match(&self.allow, &ctx, Mode::Allow) {
            Some(p) => decided(true, DecisionReason::Allowed, Some(p)),
            None => decided(
                false,
                DecisionReason::NoAllowMatched,
                Some(&first_allow.key),
            ),
        }
    }
}

fn first_match<'a>(list: &'a [Policy], ctx: &Ctx<'_>, mode: Mode) -> Option<&'a ObjKey> {
    list.iter()
        .find(|p| p.rules.iter().any(|r| r.matches(ctx, mode)))
        .map(|p| &p.key)
}

/// How HTTP-only fields count on an opaque TCP connection: an ALLOW (or AUDIT) rule with any
/// never matches; a DENY rule ignores them (Istio's TCP filter drops them from DENY rules).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Allow,
    Deny,
}

/// The request's attributes, normalised once per evaluation.
struct Ctx<'a> {
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
    namespace: Option<&'a str>,
    principal: Option<&'a str>,
    http: Option<&'a HttpRequest<'a>>,
    path: &'a str,
    /// The host without its `:port`.
    bare_host: &'a str,
}

impl<'a> Ctx<'a> {
    fn new(req: &'a Request<'a>) -> Self {
        let http = req.http.as_ref();
        Ctx {
            // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
            source_ip: req.source_ip.to_canonical(),
            destination_ip: req.destination_ip.to_canonical(),
            destination_port: req.destination_port,
            // A certificate's identity wins over the one inferred from the address.
            namespace: match req.authenticated {
                Some(a) => Some(a.namespace),
                None => req.source.map(|w| w.namespace.as_str()),
            },
            principal: match req.authenticated {
                Some(a) => Some(a.principal),
                None => req.source.map(|w| w.principal.as_str()),
            },
            http,
            path: http.map_or("", |h| path_only(h.path)),
            bare_host: http.map_or("", |h| split_port(h.host).0),
        }
    }
}

#[derive(Clone, Debug)]
struct Policy {
    key: ObjKey,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
    /// Some field only an HTTP request has (hosts, methods, paths, request principals,
    /// `request.*` conditions, or their not forms).
    http_only: bool,
}

impl Rule {
    fn new(r: &AuthzRule) -> Self {
        let when: Vec<Condition> = r.when.iter().map(Condition::new).collect();
        Rule {
            http_only: r.from.iter().any(AuthzSource::needs_l7)
                || r.to.iter().any(AuthzOperation::needs_l7)
                || when.iter().any(|c| c.attr.http_only()),
            from: r.from.iter().map(Source::new).collect(),
            to: r.to.iter().map(Operation::new).collect(),
            when,
        }
    }

    fn matches(&self, ctx: &Ctx<'_>, mode: Mode) -> bool {
        if ctx.http.is_none() && mode == Mode::Allow && self.http_only {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(ctx)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(ctx)))
            && self.when.iter().all(|c| c.holds(ctx))
    }
}

/// Every non-empty field must hold; within a field any entry (OR); a `not_*` field holds when
/// none of its entries matches. Empty lists stand for "not set".
fn field(list_len: usize, hit: impl FnOnce() -> bool) -> bool {
    list_len == 0 || hit()
}

fn not_field(list_len: usize, hit: impl FnOnce() -> bool) -> bool {
    list_len == 0 || !hit()
}

#[derive(Clone, Debug)]
struct Source {
    principals: Vec<StrMatch>,
    not_principals: Vec<StrMatch>,
    namespaces: Vec<StrMatch>,
    not_namespaces: Vec<StrMatch>,
    /// No proxy sits in front of the workloads: the remote address is the source address,
    /// so `remoteIpBlocks` join `ipBlocks` (both must hold when both are set).
    ip_blocks: Vec<IpNet>,
    not_ip_blocks: Vec<IpNet>,
    remote_ip_blocks: Vec<IpNet>,
    not_remote_ip_blocks: Vec<IpNet>,
    /// Comb validates no JWT: a request has no request principal, so `requestPrincipals`
    /// never match and `notRequestPrincipals` always hold (nothing to keep of them).
    request_principals: bool,
}

impl Source {
    fn new(s: &AuthzSource) -> Self {
        let nets = |v: &[IpNet]| v.iter().map(IpNet::trunc).collect();
        Source {
            principals: patterns(&s.principals, Star::NonEmpty),
            not_principals: patterns(&s.not_principals, Star::NonEmpty),
            namespaces: patterns(&s.namespaces, Star::NonEmpty),
            not_namespaces: patterns(&s.not_namespaces, Star::NonEmpty),
            ip_blocks: nets(&s.ip_blocks),
            not_ip_blocks: nets(&s.not_ip_blocks),
            remote_ip_blocks: nets(&s.remote_ip_blocks),
            not_remote_ip_blocks: nets(&s.not_remote_ip_blocks),
            request_principals: !s.request_principals.is_empty(),
        }
    }

    fn matches(&self, ctx: &Ctx<'_>) -> bool {
        let ip = ctx.source_ip;
        field(self.principals.len(), || any_str(&self.principals, ctx.principal))
            && not_field(self.not_principals.len(), || {
                any_str(&self.not_principals, ctx.principal)
            })
            && field(self.namespaces.len(), || any_str(&self.namespaces, ctx.namespace))
            && not_field(self.not_namespaces.len(), || {
                any_str(&self.not_namespaces, ctx.namespace)
            })
            && field(self.ip_blocks.len(), || in_nets(&self.ip_blocks, ip))
            && not_field(self.not_ip_blocks.len(), || in_nets(&self.not_ip_blocks, ip))
            && field(self.remote_ip_blocks.len(), || {
                in_nets(&self.remote_ip_blocks, ip)
            })
            && not_field(self.not_remote_ip_blocks.len(), || {
                in_nets(&self.not_remote_ip_blocks, ip)
            })
            // HTTP-only: on opaque TCP only DENY rules get here, and they ignore it.
            && (ctx.http.is_none() || !self.request_principals)
    }
}

#[derive(Clone, Debug)]
struct Operation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    hosts: Vec<HostMatch>,
    not_hosts: Vec<HostMatch>,
    methods: Vec<StrMatch>,
    not_methods: Vec<StrMatch>,
    paths: Vec<StrMatch>,
    not_paths: Vec<StrMatch>,
}

impl Operation {
    fn new(o: &AuthzOperation) -> Self {
        Operation {
            ports: o.ports.clone(),
            not_ports: o.not_ports.clone(),
            hosts: hosts(&o.hosts),
            not_hosts: hosts(&o.not_hosts),
            // Istio builds methods as `:method` header matchers: case-sensitive, `*` forms.
            methods: patterns(&o.methods, Star::Present),
            not_methods: patterns(&o.not_methods, Star::Present),
            paths: patterns(&o.paths, Star::NonEmpty),
            not_paths: patterns(&o.not_paths, Star::NonEmpty),
        }
    }

    fn matches(&self, ctx: &Ctx<'_>) -> bool {
        let port = ctx.destination_port;
        let l4 = field(self.ports.len(), || self.ports.contains(&port))
            && not_field(self.not_ports.len(), || self.not_ports.contains(&port));
        // HTTP-only: on opaque TCP only DENY rules get here, and they ignore them.
        let Some(h) = ctx.http else { return l4 };
        let host = |l: &[HostMatch]| l.iter().any(|m| m.matches(h.host, ctx.bare_host));
        let path = ctx.path;
        // Cheapest comparisons first.
        l4 && field(self.methods.len(), || {
            any_str(&self.methods, Some(h.method))
        }) && not_field(self.not_methods.len(), || {
            any_str(&self.not_methods, Some(h.method))
        }) && field(self.paths.len(), || any_str(&self.paths, Some(path)))
            && not_field(self.not_paths.len(), || {
                any_str(&self.not_paths, Some(path))
            })
            && field(self.hosts.len(), || host(&self.hosts))
            && not_field(self.not_hosts.len(), || host(&self.not_hosts))
    }
}

/// What a `when` key reads.
#[derive(Clone, Debug)]
enum Attr {
    /// `request.headers[name]`, name lowercased.
    Header(Box<str>),
    SourceNamespace,
    SourcePrincipal,
    /// `source.ip` and `remote.ip` (the same address without a proxy in front).
    SourceIp,
    DestinationIp,
    DestinationPort,
    /// `request.auth.*` and other `request.*` keys: HTTP-only and never present (no JWT).
    RequestAbsent,
    /// `connection.sni` (no TLS termination here), `experimental.*`, unknown keys.
    Absent,
}

impl Attr {
    fn new(key: &str) -> Self {
        let header = key
            .strip_prefix("request.headers[")
            .and_then(|r| r.strip_suffix(']'));
        match key {
            _ if header.is_some() => {
                Attr::Header(header.unwrap_or_default().to_ascii_lowercase().into())
            }
            "source.namespace" => Attr::SourceNamespace,
            "source.principal" => Attr::SourcePrincipal,
            "source.ip" | "remote.ip" => Attr::SourceIp,
            "destination.ip" => Attr::DestinationIp,
            "destination.port" => Attr::DestinationPort,
            _ if key.starts_with("request.") => Attr::RequestAbsent,
            _ => Attr::Absent,
        }
    }

    fn http_only(&self) -> bool {
        matches!(self, Attr::Header(_) | Attr::RequestAbsent)
    }
}

/// Condition values in the form the key compares: unparsable IP or port values are dropped
/// (comb-config rejects them; here they simply never match).
#[derive(Clone, Debug)]
enum Values {
    Str(Vec<StrMatch>),
    Net(Vec<IpNet>),
    Port(Vec<u16>),
}

#[derive(Clone, Debug)]
struct Condition {
    attr: Attr,
    /// Whether the policy listed any values / notValues (even ones that did not parse).
    has_values: bool,
    has_not_values: bool,
    values: Values,
    not_values: Values,
}

impl Condition {
    fn new(c: &AuthzCondition) -> Self {
        let attr = Attr::new(&c.key);
        let compile = |list: &[String]| match attr {
            Attr::SourceIp | Attr::DestinationIp => {
                Values::Net(list.iter().filter_map(|v| parse_net(v)).collect())
            }
            Attr::DestinationPort => {
                Values::Port(list.iter().filter_map(|v| v.parse().ok()).collect())
            }
            // Header values are header matchers (`*` = present); identities need a value.
            Attr::Header(_) => Values::Str(patterns(list, Star::Present)),
            _ => Values::Str(patterns(list, Star::NonEmpty)),
        };
        Condition {
            has_values: !c.values.is_empty(),
            has_not_values: !c.not_values.is_empty(),
            values: compile(&c.values),
            not_values: compile(&c.not_values),
            attr,
        }
    }

    /// `values` (if any) must match and `notValues` (if any) must not. An absent attribute
    /// matches no value, so its `values` fail and its `notValues` hold.
    fn holds(&self, ctx: &Ctx<'_>) -> bool {
        let Some(h) = ctx.http else {
            if self.attr.http_only() {
                // Only DENY rules get here on opaque TCP, and they ignore HTTP-only keys.
                return true;
            }
            return self.holds_with(ctx, None);
        };
        match &self.attr {
            Attr::Header(name) => {
                let v = h.headers.header(name);
                self.holds_with(ctx, Some(v.as_deref()))
            }
            _ => self.holds_with(ctx, None),
        }
    }

    /// `header`: the header's value when the key is a header.
    fn holds_with(&self, ctx: &Ctx<'_>, header: Option<Option<&str>>) -> bool {
        let hit = |vals: &Values| match (&self.attr, vals) {
            (Attr::Header(_), Values::Str(l)) => any_str(l, header.flatten()),
            (Attr::SourceNamespace, Values::Str(l)) => any_str(l, ctx.namespace),
            (Attr::SourcePrincipal, Values::Str(l)) => any_str(l, ctx.principal),
            (Attr::SourceIp, Values::Net(n)) => in_nets(n, ctx.source_ip),
            (Attr::DestinationIp, Values::Net(n)) => in_nets(n, ctx.destination_ip),
            (Attr::DestinationPort, Values::Port(p)) => p.contains(&ctx.destination_port),
            _ => false,
        };
        (!self.has_values || hit(&self.values)) && (!self.has_not_values || !hit(&self.not_values))
    }
}

#[cfg(test)]
mod tests;
