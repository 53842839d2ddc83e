//! Istio's standard metric labels: the borrowed key a record maps to (hashed and compared
//! without allocating on the request path), its owned copy kept per series, and the label
//! text rendered once when the series is created.

use std::hash::Hash;

use comb_model::l7::Workload;

use super::{Reporter, RequestProtocol, RequestRecord, ResponseFlags, TcpRecord};

/// Istio's value for anything not known.
pub const UNKNOWN: &str = "unknown";

/// Istio's `connection_security_policy`: `mutual_tls` for what went through an HBONE
/// tunnel, `none` for plaintext.
pub fn security_policy(mtls: bool) -> &'static str {
    if mtls { "mutual_tls" } else { "none" }
}

/// The workload fields a peer contributes to the labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerRef<'a> {
    pub workload: &'a str,
    pub namespace: &'a str,
    /// `cluster.local/ns/<ns>/sa/<sa>` (printed with `spiffe://`).
    pub principal: &'a str,
    pub canonical_service: &'a str,
    pub canonical_revision: &'a str,
}

impl<'a> PeerRef<'a> {
    pub fn of(w: &'a Workload) -> Self {
        PeerRef {
            workload: &w.workload,
            namespace: &w.namespace,
            principal: &w.principal,
            canonical_service: &w.canonical_service,
            canonical_revision: &w.canonical_revision,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    workload: Box<str>,
    namespace: Box<str>,
    principal: Box<str>,
    canonical_service: Box<str>,
    canonical_revision: Box<str>,
}

impl Peer {
    fn own(p: PeerRef<'_>) -> Self {
        Peer {
            workload: p.workload.into(),
            namespace: p.namespace.into(),
            principal: p.principal.into(),
            canonical_service: p.canonical_service.into(),
            canonical_revision: p.canonical_revision.into(),
        }
    }

    fn view(&self) -> PeerRef<'_> {
        PeerRef {
            workload: &self.workload,
            namespace: &self.namespace,
            principal: &self.principal,
            canonical_service: &self.canonical_service,
            canonical_revision: &self.canonical_revision,
        }
    }
}

/// What identifies an `istio_requests_total` (and request histogram) series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HttpKeyRef<'a> {
    pub source: Option<PeerRef<'a>>,
    pub destination: Option<PeerRef<'a>>,
    pub destination_service: Option<&'a str>,
    pub protocol: RequestProtocol,
    pub response_code: u16,
    pub grpc_status: Option<u32>,
    pub flags: ResponseFlags,
    pub mtls: bool,
}

impl<'a> HttpKeyRef<'a> {
    pub fn of(r: &'a RequestRecord) -> Self {
        HttpKeyRef {
            source: r.source.as_deref().map(PeerRef::of),
            destination: r.destination.as_deref().map(PeerRef::of),
            destination_service: r.destination_service.as_deref(),
            protocol: r.protocol,
            response_code: r.response_code,
            grpc_status: r.grpc_status,
            flags: r.response_flags,
            mtls: r.mtls,
        }
    }
}

/// What identifies an `istio_tcp_*` series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpKeyRef<'a> {
    pub source: Option<PeerRef<'a>>,
    pub destination: Option<PeerRef<'a>>,
    pub destination_service: Option<&'a str>,
    pub flags: ResponseFlags,
    pub mtls: bool,
    pub reporter: Reporter,
}

impl<'a> TcpKeyRef<'a> {
    pub fn of(r: &'a TcpRecord) -> Self {
        TcpKeyRef {
            source: r.source.as_deref().map(PeerRef::of),
            destination: r.destination.as_deref().map(PeerRef::of),
            destination_service: r.destination_service.as_deref(),
            flags: r.response_flags,
            mtls: r.mtls,
            reporter: r.reporter,
        }
    }
}

/// A series key: borrowed form for lookups, owned form stored, label text for rendering.
pub trait SeriesKey: Send + Sync + 'static {
    type Ref<'a>: Copy + Hash + PartialEq;
    fn own(r: Self::Ref<'_>) -> Self;
    fn view(&self) -> Self::Ref<'_>;
    /// `self.view() == r` (GAT lifetimes cannot be unified generically).
    fn matches(&self, r: Self::Ref<'_>) -> bool;
    /// `name="value",...` (no braces), in a fixed label order.
    fn render(r: Self::Ref<'_>) -> String;
}

#[derive(Debug)]
pub struct HttpKey {
    source: Option<Peer>,
    destination: Option<Peer>,
    destination_service: Option<Box<str>>,
    protocol: RequestProtocol,
    response_code: u16,
    grpc_status: Option<u32>,
    flags: ResponseFlags,
    mtls: bool,
}

impl SeriesKey for HttpKey {
    type Ref<'a> = HttpKeyRef<'a>;

    fn own(r: HttpKeyRef<'_>) -> Self {
        HttpKey {
            source: r.source.map(Peer::own),
            destination: r.destination.map(Peer::own),
            destination_service: r.destination_service.map(Into::into),
            protocol: r.protocol,
            response_code: r.response_code,
            grpc_status: r.grpc_status,
            flags: r.flags,
            mtls: r.mtls,
        }
    }

    fn view(&self) -> HttpKeyRef<'_> {
        HttpKeyRef {
            source: self.source.as_ref().map(Peer::view),
            destination: self.destination.as_ref().map(Peer::view),
            destination_service: self.destination_service.as_deref(),
            protocol: self.protocol,
            response_code: self.response_code,
            grpc_status: self.grpc_status,
            flags: self.flags,
            mtls: self.mtls,
        }
    }

    fn matches(&self, r: HttpKeyRef<'_>) -> bool {
        self.view() == r
    }

    fn render(r: HttpKeyRef<'_>) -> String {
        let mut out = String::with_capacity(768);
        // Requests are only seen by the proxy in front of their destination.
        peers(
            &mut out,
            Reporter::Destination,
            r.source,
            r.destination,
            r.destination_service,
        );
        label(&mut out, "request_protocol", r.protocol.as_str());
        label(&mut out, "response_code", &r.response_code.to_string());
        let grpc = match (r.protocol, r.grpc_status) {
            (RequestProtocol::Grpc, Some(s)) => s.to_string(),
            _ => String::new(),
        };
        label(&mut out, "grpc_response_status", &grpc);
        label(&mut out, "response_flags", &r.flags.render());
        label(
            &mut out,
            "connection_security_policy",
            security_policy(r.mtls),
        );
        out
    }
}

#[derive(Debug)]
pub struct TcpKey {
    source: Option<Peer>,
    destination: Option<Peer>,
    destination_service: Option<Box<str>>,
    flags: ResponseFlags,
    mtls: bool,
    reporter: Reporter,
}

impl SeriesKey for TcpKey {
    type Ref<'a> = TcpKeyRef<'a>;

    fn own(r: TcpKeyRef<'_>) -> Self {
        TcpKey {
            source: r.source.map(Peer::own),
            destination: r.destination.map(Peer::own),
            destination_service: r.destination_service.map(Into::into),
            flags: r.flags,
            mtls: r.mtls,
            reporter: r.reporter,
        }
    }

    fn view(&self) -> TcpKeyRef<'_> {
        TcpKeyRef {
            source: self.source.as_ref().map(Peer::view),
            destination: self.destination.as_ref().map(Peer::view),
            destination_service: self.destination_service.as_deref(),
            flags: self.flags,
            mtls: self.mtls,
            reporter: self.reporter,
        }
    }

    fn matches(&self, r: TcpKeyRef<'_>) -> bool {
        self.view() == r
    }

    fn render(r: TcpKeyRef<'_>) -> String {
        let mut out = String::with_capacity(640);
        peers(
            &mut out,
            r.reporter,
            r.source,
            r.destination,
            r.destination_service,
        );
        label(&mut out, "request_protocol", "tcp");
        label(&mut out, "response_flags", &r.flags.render());
        label(
            &mut out,
            "connection_security_policy",
            security_policy(r.mtls),
        );
        out
    }
}

/// The labels both families share, in Istio's documented order.
fn peers(
    out: &mut String,
    reporter: Reporter,
    src: Option<PeerRef<'_>>,
    dst: Option<PeerRef<'_>>,
    svc: Option<&str>,
) {
    label(out, "reporter", reporter.as_str());
    peer_identity(out, "source", src);
    peer_canonical(out, "source", src);
    peer_identity(out, "destination", dst);
    let svc = svc.filter(|s| !s.is_empty());
    // `name.ns.svc.cluster.local` → name, ns.
    let mut parts = svc.map(|s| s.split('.'));
    let name = parts.as_mut().and_then(Iterator::next).unwrap_or(UNKNOWN);
    let ns = parts.as_mut().and_then(Iterator::next).unwrap_or(UNKNOWN);
    label(out, "destination_service", svc.unwrap_or(UNKNOWN));
    label(out, "destination_service_name", name);
    label(out, "destination_service_namespace", ns);
    peer_canonical(out, "destination", dst);
}

fn field<'a>(p: Option<PeerRef<'a>>, f: fn(PeerRef<'a>) -> &'a str) -> &'a str {
    p.map(f).filter(|s| !s.is_empty()).unwrap_or(UNKNOWN)
}

/// `<side>_workload`, `_workload_namespace`, `_principal`, `_app`, `_version` (app and version
/// are the canonical service and revision, which already fall back to the `app`/`version`
/// labels).
fn peer_identity(out: &mut String, side: &str, p: Option<PeerRef<'_>>) {
    label_kv(out, side, "workload", field(p, |p| p.workload));
    label_kv(out, side, "workload_namespace", field(p, |p| p.namespace));
    match p {
        Some(p) if !p.principal.is_empty() => {
            label_kv(out, side, "principal", &format!("spiffe://{}", p.principal))
        }
        _ => label_kv(out, side, "principal", UNKNOWN),
    }
    label_kv(out, side, "app", field(p, |p| p.canonical_service));
    label_kv(out, side, "version", field(p, |p| p.canonical_revision));
}

fn peer_canonical(out: &mut String, side: &str, p: Option<PeerRef<'_>>) {
    label_kv(
        out,
        side,
        "canonical_service",
        field(p, |p| p.canonical_service),
    );
    label_kv(
        out,
        side,
        "canonical_revision",
        field(p, |p| p.canonical_revision),
    );
}

fn label_kv(out: &mut String, side: &str, name: &str, value: &str) {
    if !out.is_empty() {
        out.push(',');
    }
    out.push_str(side);
    out.push('_');
    out.push_str(name);
    out.push_str("=\"");
    escape_into(out, value);
    out.push('"');
}

pub fn label(out: &mut String, name: &str, value: &str) {
    if !out.is_empty() {
        out.push(',');
    }
    out.push_str(name);
    out.push_str("=\"");
    escape_into(out, value);
    out.push('"');
}

/// Prometheus text format label value escaping: backslash, double quote, line feed.
pub fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}
