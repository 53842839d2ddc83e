//! The policy compiler: NetworkPolicy and AuthorizationPolicy (L4 part) → per-endpoint
//! entries of the kernel's policy table, keyed by (peer identity, direction, protocol, port
//! prefix).
//!
//! The kernel does one longest-prefix lookup for the peer's identity and, on a miss, one for
//! [`ID_ANY`]; the first hit is the answer. So all precedence is settled here: for every
//! identity the compiler evaluates the policies on each piece of the port space where they
//! are constant, and writes that identity's complete function (an any-protocol entry, a
//! per-protocol default, port blocks where the verdict differs) unless it equals what
//! [`ID_ANY`] gets. A direction no policy enforces gets no entries (the kernel allows).
//!
//! Semantics (docs/policy.md has the full table):
//! - NetworkPolicy: a direction is enforced when a policy selecting the pod lists it; then a
//!   flow needs a rule of some selecting policy whose peer and port match. Rules add up.
//! - AuthorizationPolicy governs TCP to the selected workloads (ingress), as in Istio: DENY
//!   wins, then if any ALLOW policy selects the workload a flow needs a matching ALLOW rule
//!   (an ALLOW policy without rules allows nothing). A rule with L7 fields sends the flows its
//!   L4 part matches to the node proxy (REDIRECT), for ALLOW and DENY alike: never decided,
//!   widened or dropped on the L4 part alone.
//! - Both layers must allow. The node itself may always reach its pods (health checks).
//! - L7 visibility (`comb.dev/l7: "true"` on the pod or its namespace): every ingress TCP flow
//!   that would be allowed is a REDIRECT with reason [`Reason::L7Visibility`] instead (the
//!   node's own flows excepted); the pod's ingress is then enforced even without policies.

mod ports;
pub(crate) mod select;

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::identity::{ID_ANY, ID_HOST, Identity, IdentityId, IdentityTable};
use crate::objects::{ObjKey, Pod, Protocol};
use crate::policy::{
    AuthorizationPolicy, AuthzAction, AuthzRule, ISTIO_ROOT_NAMESPACE, NetworkPolicy, NpPort,
    NpPortSpec, NpRule,
};
use crate::snapshot::Snapshot;
use crate::terms::{Direction, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Reason, Verdict};
use ports::{Boundaries, blocks};
use select::{M, authz_condition, authz_source, np_peer, parse_net};

/// Protocols with ports; anything else is judged by the any-protocol entry.
const PORTED: [u8; 3] = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntryKey {
    pub identity: IdentityId,
    pub direction: Direction,
    /// 0 = every protocol.
    pub protocol: u8,
    pub port: u16,
    /// Leading bits of `port` that must match (0..=16); 0 with `port` 0 = every port.
    pub port_prefix: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntryValue {
    pub verdict: Verdict,
    pub reason: Reason,
    /// [`policy_id`] of the deciding policy; 0 = none.
    pub policy: u32,
}

/// A policy by kind and name, with its stable number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyRef {
    pub kind: String,
    pub key: ObjKey,
    pub id: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledEndpoint {
    pub entries: BTreeMap<EntryKey, EntryValue>,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// Policies that select this endpoint.
    pub policies: Vec<PolicyRef>,
    /// `comb.dev/l7` visibility: allowed ingress TCP flows are REDIRECT entries.
    pub l7_visibility: bool,
}

impl CompiledEndpoint {
    /// Some ingress entry sends flows to the node proxy: the ipcache value of the pod's
    /// addresses must carry its host-veth ifindex (`endpoint`, docs/l7.md), so the source
    /// pod's hook looks the entry up and redirects there.
    pub fn redirects_ingress(&self) -> bool {
        self.entries
            .iter()
            .any(|(k, v)| k.direction == Direction::Ingress && v.verdict == Verdict::Redirect)
    }
}

pub const KIND_NETWORK_POLICY: &str = "NetworkPolicy";
pub const KIND_AUTHORIZATION_POLICY: &str = "AuthorizationPolicy";

/// A stable, non-zero number for a policy (FNV-1a of kind/namespace/name), so conntrack
/// entries and flow events can name it without a shared table. A collision only mislabels.
pub fn policy_id(kind: &str, key: &ObjKey) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in format!("{kind}/{}/{}", key.namespace, key.name).bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// Every CIDR policies name: each becomes an ipcache entry (and an identity unless something
/// more specific already owns that exact prefix), which is what makes ipBlock matching exact.
pub fn policy_cidrs(snapshot: &Snapshot) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    for np in snapshot.network_policies.values() {
        for rule in np.ingress.iter().chain(&np.egress) {
            for peer in &rule.peers {
                if let crate::policy::NpPeer::IpBlock { cidr, except } = peer {
                    out.insert(cidr.trunc());
                    out.extend(except.iter().map(IpNet::trunc));
                }
            }
        }
    }
    for ap in snapshot.authorization_policies.values() {
        for rule in &ap.rules {
            for s in &rule.from {
                for n in s
                    .ip_blocks
                    .iter()
                    .chain(&s.not_ip_blocks)
                    .chain(&s.remote_ip_blocks)
                    .chain(&s.not_remote_ip_blocks)
                {
                    out.insert(n.trunc());
                }
            }
            for c in &rule.when {
                if c.key == "source.ip" || c.key == "remote.ip" {
                    out.extend(
                        c.values
                            .iter()
                            .chain(&c.not_values)
                            .filter_map(|v| parse_net(v)),
                    );
                }
            }
        }
    }
    // /0 is what the world identities already stand for.
    out.retain(|n| n.prefix_len() > 0);
    out
}

fn np_selects(np: &NetworkPolicy, pod: &Pod) -> bool {
    np.key.namespace == pod.key.namespace && np.pod_selector.matches(&pod.labels)
}

/// Whether an AuthorizationPolicy applies to `pod` (also used by the L7 proxy table).
pub(crate) fn authz_selects(ap: &AuthorizationPolicy, pod: &Pod) -> bool {
    (ap.key.namespace == pod.key.namespace || ap.key.namespace == ISTIO_ROOT_NAMESPACE)
        && ap
            .selector
            .as_ref()
            .is_none_or(|sel| sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
}

/// What applies to one endpoint.
struct Ctx<'a> {
    snapshot: &'a Snapshot,
    table: &'a IdentityTable,
    pod: &'a Pod,
    /// (policy id, policy) selecting the pod, with the direction enforced.
    np_ingress: Vec<(u32, &'a NetworkPolicy)>,
    np_egress: Vec<(u32, &'a NetworkPolicy)>,
    authz: Vec<(u32, &'a AuthorizationPolicy)>,
    /// `comb.dev/l7` visibility of the pod.
    visibility: bool,
    /// Namespace labels as namespace selectors see them, computed once.
    ns_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// The rules that can matter for one identity in one direction, with the parts that depend
/// only on the identity already judged. Building it is the only per-identity cost when an
/// identity turns out to behave like every other one.
struct View<'a> {
    /// NetworkPolicy rules whose peers select the identity (or every peer), in policy order.
    np: Vec<(u32, &'a NpRule)>,
    authz: Vec<AuthzView<'a>>,
    /// An egress rule names a port: its numbers depend on the identity's pods.
    named_egress: bool,
}

/// Same rules (by address: they are the snapshot's) with the same identity-only matches.
impl PartialEq for View<'_> {
    fn eq(&self, o: &Self) -> bool {
        self.named_egress == o.named_egress
            && self.np.len() == o.np.len()
            && self
                .np
                .iter()
                .zip(&o.np)
                .all(|(a, b)| a.0 == b.0 && std::ptr::eq(a.1, b.1))
            && self.authz.len() == o.authz.len()
            && self.authz.iter().zip(&o.authz).all(|(a, b)| {
                a.policy == b.policy
                    && a.action == b.action
                    && std::ptr::eq(a.rule, b.rule)
                    && a.ident == b.ident
            })
    }
}

struct AuthzView<'a> {
    policy: u32,
    action: AuthzAction,
    rule: &'a AuthzRule,
    l7: bool,
    /// `from` and the identity-only `when` conditions.
    ident: M,
}

impl<'a> Ctx<'a> {
    fn nps(&self, dir: Direction) -> &[(u32, &'a NetworkPolicy)] {
        match dir {
            Direction::Ingress => &self.np_ingress,
            Direction::Egress => &self.np_egress,
        }
    }

    fn rules(np: &NetworkPolicy, dir: Direction) -> &[NpRule] {
        match dir {
            Direction::Ingress => &np.ingress,
            Direction::Egress => &np.egress,
        }
    }

    fn authz_governs(&self, dir: Direction) -> bool {
        dir == Direction::Ingress
            && self
                .authz
                .iter()
                .any(|(_, ap)| ap.action != AuthzAction::Audit)
    }

    fn enforced(&self, dir: Direction) -> bool {
        !self.nps(dir).is_empty()
            || self.authz_governs(dir)
            || (dir == Direction::Ingress && self.visibility)
    }

    fn view(&self, dir: Direction, ident: Option<&Identity>) -> View<'a> {
        let mut view = View {
            np: vec![],
            authz: vec![],
            named_egress: false,
        };
        for (id, np) in self.nps(dir) {
            for rule in Self::rules(np, dir) {
                let selected = rule.peers.is_empty()
                    || rule
                        .peers
                        .iter()
                        .any(|p| np_peer(p, &np.key.namespace, ident, &self.ns_labels) == M::Yes);
                if selected {
                    view.np.push((*id, rule));
                    view.named_egress |= dir == Direction::Egress
                        && rule
                            .ports
                            .iter()
                            .any(|p| matches!(p.port, Some(NpPortSpec::Name(_))));
                }
            }
        }
        if self.authz_governs(dir) {
            for (id, ap) in &self.authz {
                if ap.action == AuthzAction::Audit {
                    continue;
                }
                for rule in &ap.rules {
                    let from = if rule.from.is_empty() {
                        M::Yes
                    } else {
                        rule.from
                            .iter()
                            .map(|s| authz_source(s, ident))
                            .fold(M::No, M::or)
                    };
                    let when = rule
                        .when
                        .iter()
                        .filter(|c| c.key != "destination.port")
                        .map(|c| authz_condition(c, ident, 0))
                        .fold(M::Yes, M::and);
                    let m = from.and(when);
                    if m != M::No {
                        view.authz.push(AuthzView {
                            policy: *id,
                            action: ap.action,
                            rule,
                            l7: rule.needs_l7(),
                            ident: m,
                        });
                    }
                }
            }
        }
        view
    }

    /// Ports a named port stands for: the pod's own for ingress, the peer identity's pods'
    /// for egress (every pod of the identity; an unknown identity has none).
    fn named_ports(
        &self,
        dir: Direction,
        ident: Option<&Identity>,
        name: &str,
        proto: Protocol,
    ) -> Vec<u16> {
        let from_pod = |p: &Pod| -> Vec<u16> {
            p.ports
                .iter()
                .filter(|c| c.name.as_deref() == Some(name) && c.protocol == proto)
                .map(|c| c.port)
                .collect()
        };
        match dir {
            Direction::Ingress => from_pod(self.pod),
            Direction::Egress => {
                let Some(ident) = ident else { return vec![] };
                let pods = self
                    .table
                    .pods_of
                    .get(&ident.id)
                    .map_or(&[][..], Vec::as_slice);
                let mut out: Vec<u16> = pods
                    .iter()
                    .filter_map(|k| self.snapshot.pods.get(k))
                    .flat_map(from_pod)
                    .collect();
                out.sort_unstable();
                out.dedup();
                out
            }
        }
    }

    /// Port ranges of an NP port entry for `proto`; `None` = every port.
    fn np_port_ranges(
        &self,
        dir: Direction,
        ident: Option<&Identity>,
        p: &NpPort,
        proto: u8,
    ) -> Option<Vec<(u16, u16)>> {
        if Protocol::number(p.protocol) != proto {
            return Some(vec![]);
        }
        match &p.port {
            None => None,
            Some(NpPortSpec::Range { port, end }) => Some(vec![(*port, *end)]),
            Some(NpPortSpec::Name(n)) => Some(
                self.named_ports(dir, ident, n, p.protocol)
                    .into_iter()
                    .map(|x| (x, x))
                    .collect(),
            ),
        }
    }

    /// The port boundaries that matter for the view's rules and `proto`.
    fn boundaries(
        &self,
        dir: Direction,
        view: &View<'_>,
        ident: Option<&Identity>,
        proto: u8,
    ) -> Boundaries {
        let mut b = Boundaries::default();
        for (_, rule) in &view.np {
            for p in &rule.ports {
                for (lo, hi) in self
                    .np_port_ranges(dir, ident, p, proto)
                    .unwrap_or_default()
                {
                    b.add(lo, hi);
                }
            }
        }
        if proto == IPPROTO_TCP {
            for av in &view.authz {
                for op in &av.rule.to {
                    for port in op.ports.iter().chain(&op.not_ports) {
                        b.add(*port, *port);
                    }
                }
                for c in av.rule.when.iter().filter(|c| c.key == "destination.port") {
                    for v in c.values.iter().chain(&c.not_values) {
                        if let Ok(port) = v.parse::<u16>() {
                            b.add(port, port);
                        }
                    }
                }
            }
        }
        b
    }

    fn np_port_ok(
        &self,
        dir: Direction,
        rule: &NpRule,
        ident: Option<&Identity>,
        proto: u8,
        port: u16,
    ) -> bool {
        rule.ports.is_empty()
            || rule
                .ports
                .iter()
                .any(|p| match self.np_port_ranges(dir, ident, p, proto) {
                    None => true,
                    Some(ranges) => ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port)),
                })
    }

    /// An AuthorizationPolicy rule of the view at `port`.
    fn authz_rule(av: &AuthzView<'_>, ident: Option<&Identity>, port: u16) -> M {
        let rule = av.rule;
        let to = if rule.to.is_empty() {
            M::Yes
        } else {
            let op_ok = rule.to.iter().any(|op| {
                (op.ports.is_empty() || op.ports.contains(&port)) && !op.not_ports.contains(&port)
            });
            if op_ok { M::Yes } else { M::No }
        };
        let when = rule
            .when
            .iter()
            .filter(|c| c.key == "destination.port")
            .map(|c| authz_condition(c, ident, port))
            .fold(M::Yes, M::and);
        av.ident.and(to).and(when)
    }

    /// The verdict for one (identity, direction, protocol, port); `proto` 0 = a protocol
    /// without ports.
    fn eval(
        &self,
        dir: Direction,
        view: &View<'_>,
        ident: Option<&Identity>,
        proto: u8,
        port: u16,
    ) -> EntryValue {
        let v = |verdict, reason, policy| EntryValue {
            verdict,
            reason,
            policy,
        };
        if dir == Direction::Ingress && ident.is_some_and(|i| i.id == ID_HOST) {
            return v(Verdict::Allow, Reason::Host, 0);
        }
        let mut allowed_by = 0;
        let nps = self.nps(dir);
        if !nps.is_empty() {
            let allowing = view
                .np
                .iter()
                .find(|(_, r)| self.np_port_ok(dir, r, ident, proto, port));
            match allowing {
                Some((id, _)) => allowed_by = *id,
                None => return v(Verdict::Deny, Reason::PolicyDenied, nps[0].0),
            }
        }
        if self.authz_governs(dir) && proto == IPPROTO_TCP {
            let hit = |action, l7, want: fn(M) -> bool| {
                view.authz.iter().find(|av| {
                    av.action == action && av.l7 == l7 && want(Self::authz_rule(av, ident, port))
                })
            };
            if let Some(av) = hit(AuthzAction::Deny, false, M::maybe) {
                return v(Verdict::Deny, Reason::AuthzDeny, av.policy);
            }
            let mut redirect = None;
            let first_allow = self
                .authz
                .iter()
                .find(|(_, ap)| ap.action == AuthzAction::Allow);
            if let Some((first, _)) = first_allow {
                let yes = |m: M| m == M::Yes;
                if let Some(av) = hit(AuthzAction::Allow, false, yes) {
                    if allowed_by == 0 {
                        allowed_by = av.policy;
                    }
                } else if let Some(av) = hit(AuthzAction::Allow, true, yes) {
                    redirect = Some(av.policy);
                } else {
                    return v(Verdict::Deny, Reason::AuthzNoAllow, *first);
                }
            }
            if let Some(av) = hit(AuthzAction::Deny, true, M::maybe) {
                redirect = Some(av.policy);
            }
            if let Some(id) = redirect {
                return v(Verdict::Redirect, Reason::ProxyUnavailable, id);
            }
        }
        if dir == Direction::Ingress && proto == IPPROTO_TCP && self.visibility {
            return v(Verdict::Redirect, Reason::L7Visibility, allowed_by);
        }
        v(Verdict::Allow, Reason::PolicyAllow, allowed_by)
    }

    /// The complete function of one identity in one direction: the any-protocol value and,
    /// per ported protocol, the merged intervals.
    fn function(&self, dir: Direction, view: &View<'_>, ident: Option<&Identity>) -> Function {
        let other = self.eval(dir, view, ident, 0, 0);
        let protos = PORTED
            .iter()
            .map(|&proto| {
                let mut pieces: Vec<Piece> = Vec::new();
                for (lo, hi) in self.boundaries(dir, view, ident, proto).intervals() {
                    let val = self.eval(dir, view, ident, proto, lo);
                    match pieces.last_mut() {
                        Some(last) if last.2 == val => last.1 = hi,
                        _ => pieces.push((lo, hi, val)),
                    }
                }
                (proto, pieces)
            })
            .collect();
        Function { other, protos }
    }
}

/// Inclusive port range with one value.
type Piece = (u16, u16, EntryValue);

#[derive(PartialEq, Eq)]
struct Function {
    other: EntryValue,
    protos: Vec<(u8, Vec<Piece>)>,
}

impl Function {
    fn emit(
        &self,
        identity: IdentityId,
        direction: Direction,
        out: &mut BTreeMap<EntryKey, EntryValue>,
    ) {
        let key = |protocol, port, port_prefix| EntryKey {
            identity,
            direction,
            protocol,
            port,
            port_prefix,
        };
        out.insert(key(0, 0, 0), self.other);
        for (proto, pieces) in &self.protos {
            // The protocol default is the value on most ports; other pieces become blocks.
            let mut weight: BTreeMap<EntryValue, u32> = BTreeMap::new();
            for (lo, hi, v) in pieces {
                *weight.entry(*v).or_default() += u32::from(*hi) - u32::from(*lo) + 1;
            }
            let default = weight
                .iter()
                .max_by_key(|(v, w)| (**w, **v == self.other))
                .map(|(v, _)| *v)
                .unwrap_or(self.other);
            if default != self.other {
                out.insert(key(*proto, 0, 0), default);
            }
            for (lo, hi, v) in pieces.iter().filter(|(_, _, v)| *v != default) {
                for (start, bits) in blocks(*lo, *hi) {
                    out.insert(key(*proto, start, bits), *v);
                }
            }
        }
    }
}

/// Compiles what applies to `pod` (a local pod with an identity table entry).
impl<'a> Ctx<'a> {
    /// What applies to `pod`, and the policies that select it.
    fn new(
        snapshot: &'a Snapshot,
        table: &'a IdentityTable,
        pod: &'a Pod,
    ) -> (Self, Vec<PolicyRef>) {
        let mut ns_labels = BTreeMap::new();
        let namespaces = snapshot
            .namespaces
            .keys()
            .map(String::as_str)
            .chain(table.identities.values().filter_map(Identity::namespace));
        for ns in namespaces {
            ns_labels
                .entry(ns.to_owned())
                .or_insert_with(|| IdentityTable::namespace_labels(snapshot, ns));
        }
        let mut ctx = Ctx {
            snapshot,
            table,
            pod,
            np_ingress: vec![],
            np_egress: vec![],
            authz: vec![],
            visibility: snapshot.l7_visibility(pod),
            ns_labels,
        };
        let mut policies = Vec::new();
        for np in snapshot
            .network_policies
            .values()
            .filter(|np| np_selects(np, pod))
        {
            let id = policy_id(KIND_NETWORK_POLICY, &np.key);
            if np.ingress_enforced {
                ctx.np_ingress.push((id, np));
            }
            if np.egress_enforced {
                ctx.np_egress.push((id, np));
            }
            policies.push(PolicyRef {
                kind: KIND_NETWORK_POLICY.into(),
                key: np.key.clone(),
                id,
            });
        }
        for ap in snapshot
            .authorization_policies
            .values()
            .filter(|ap| authz_selects(ap, pod))
        {
            let id = policy_id(KIND_AUTHORIZATION_POLICY, &ap.key);
            ctx.authz.push((id, ap));
            policies.push(PolicyRef {
                kind: KIND_AUTHORIZATION_POLICY.into(),
                key: ap.key.clone(),
                id,
            });
        }
        (ctx, policies)
    }
}

/// Compiles what applies to `pod` (a local pod with an identity table entry).
pub fn compile_endpoint(snapshot: &Snapshot, table: &IdentityTable, pod: &Pod) -> CompiledEndpoint {
    let (ctx, policies) = Ctx::new(snapshot, table, pod);
    let mut out = CompiledEndpoint {
        ingress_enforced: ctx.enforced(Direction::Ingress),
        egress_enforced: ctx.enforced(Direction::Egress),
        l7_visibility: ctx.visibility,
        policies,
        ..Default::default()
    };
    for dir in [Direction::Ingress, Direction::Egress] {
        if !ctx.enforced(dir) {
            continue;
        }
        let any_view = ctx.view(dir, None);
        let any = ctx.function(dir, &any_view, None);
        any.emit(ID_ANY, dir, &mut out.entries);
        for ident in table.identities.values() {
            let view = ctx.view(dir, Some(ident));
            // Same rules with the same identity-only matches: the same function as every
            // other identity, unless something else depends on who the peer is.
            let special = ident.id == ID_HOST || view.named_egress;
            if !special && view == any_view {
                continue;
            }
            let f = ctx.function(dir, &view, Some(ident));
            if f != any {
                f.emit(ident.id, dir, &mut out.entries);
            }
        }
    }
    out
}

/// The verdict the kernel would reach for a new flow, by the same lookup it does; for tests
/// (here and in the policy bench) that check compiled tables.
pub fn lookup(
    entries: &BTreeMap<EntryKey, EntryValue>,
    identity: IdentityId,
    direction: Direction,
    protocol: u8,
    port: u16,
) -> Option<EntryValue> {
    let hit = |id: IdentityId| {
        entries
            .iter()
            .filter(|(k, _)| k.identity == id && k.direction == direction)
            .filter(|(k, _)| {
                k.protocol == 0
                    || (k.protocol == protocol
                        && (k.port_prefix == 0
                            || (port >> (16 - u32::from(k.port_prefix)))
                                == (k.port >> (16 - u32::from(k.port_prefix)))))
            })
            .max_by_key(|(k, _)| (k.protocol != 0, k.port_prefix))
            .map(|(_, v)| *v)
    };
    hit(identity).or_else(|| hit(ID_ANY))
}

#[cfg(test)]
mod tests;
