//! `comb tunnel list`: the node proxy's HBONE tunnels (pooled outbound connections) and how
//! new flows got their stream (docs/mtls.md, "HBONE").

use std::fmt::Write as _;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HandshakeKind {
    Full,
    Resumed,
}

/// One pooled outbound connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelRow {
    pub local: SocketAddr,
    /// The peer's HBONE address (`pod-ip:15008`).
    pub peer: SocketAddr,
    /// The node of the peer pod, as the agent's State knows it (filled by the agent).
    #[serde(default)]
    pub peer_node: Option<String>,
    pub local_identity: String,
    pub peer_identity: String,
    pub streams_active: u32,
    pub streams_total: u64,
    /// Tunneled payload bytes (local pod → peer, peer → local pod).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub age_secs: u64,
    pub handshake: HandshakeKind,
}

/// Where outbound flows' streams came from since the proxy started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCounters {
    pub full_handshakes: u64,
    pub resumptions: u64,
    /// Flows that took a stream on a connection already open.
    pub reuses: u64,
    /// Connection attempts that failed (connect, TLS, HTTP/2, timeout, pool full).
    pub failures: u64,
}

/// The inbound side (port 15008) since the proxy started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundCounters {
    /// Mutual-TLS handshakes completed.
    pub handshakes: u64,
    /// Connections closed before or during the handshake (not TLS, no or a foreign client
    /// certificate, no identity at the address, timeouts).
    pub refused: u64,
    /// CONNECT streams answered 200.
    pub streams: u64,
    /// CONNECT streams answered 400, 401 or 503.
    pub rejected_streams: u64,
}

/// `Query::Tunnels`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelsReply {
    pub enabled: bool,
    pub outbound: PoolCounters,
    pub inbound: InboundCounters,
    pub tunnels: Vec<TunnelRow>,
}

pub fn render_table(r: &TunnelsReply) -> String {
    let mut out = String::new();
    if !r.enabled {
        return "HBONE is off (--hbone off)\n".into();
    }
    let o = &r.outbound;
    let i = &r.inbound;
    let _ = writeln!(
        out,
        "outbound: {} full handshakes, {} resumptions, {} reuses, {} failures",
        o.full_handshakes, o.resumptions, o.reuses, o.failures
    );
    let _ = writeln!(
        out,
        "inbound: {} handshakes, {} refused, {} streams, {} rejected\n",
        i.handshakes, i.refused, i.streams, i.rejected_streams
    );
    let rows: Vec<Vec<String>> = r
        .tunnels
        .iter()
        .map(|t| {
            vec![
                t.peer.to_string(),
                t.peer_node.clone().unwrap_or_else(|| "-".into()),
                t.local_identity.clone(),
                t.peer_identity.clone(),
                format!("{}/{}", t.streams_active, t.streams_total),
                t.bytes_sent.to_string(),
                t.bytes_received.to_string(),
                format!("{}s", t.age_secs),
                match t.handshake {
                    HandshakeKind::Full => "full".into(),
                    HandshakeKind::Resumed => "resumed".into(),
                },
            ]
        })
        .collect();
    out += &crate::table::render(
        &[
            "PEER",
            "NODE",
            "LOCAL IDENTITY",
            "PEER IDENTITY",
            "STREAMS",
            "SENT",
            "RECEIVED",
            "AGE",
            "HANDSHAKE",
        ],
        &rows,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape_and_table() {
        let r = TunnelsReply {
            enabled: true,
            outbound: PoolCounters {
                full_handshakes: 1,
                resumptions: 0,
                reuses: 999,
                failures: 0,
            },
            inbound: InboundCounters::default(),
            tunnels: vec![TunnelRow {
                local: "198.18.1.2:40000".parse().unwrap(),
                peer: "198.18.2.2:15008".parse().unwrap(),
                peer_node: Some("n2".into()),
                local_identity: "spiffe://cluster.local/ns/a/sa/client".into(),
                peer_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
                streams_active: 1,
                streams_total: 1000,
                bytes_sent: 10,
                bytes_received: 20,
                age_secs: 5,
                handshake: HandshakeKind::Full,
            }],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["tunnels"][0]["handshake"], "full");
        assert_eq!(v["outbound"]["reuses"], 999);
        let back: TunnelsReply = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        let t = render_table(&r);
        assert!(t.contains("198.18.2.2:15008"), "{t}");
        assert!(t.contains("1/1000"), "{t}");
        assert!(t.contains(" n2 "), "{t}");
    }
}
