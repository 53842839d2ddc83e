//! Arbitrary bytes as a downstream connection into the node proxy's `serve_connection`, over
//! a real loopback socket: whatever the detection makes of them (HTTP/1, h2, opaque), the
//! proxy must not panic and the connection task must end once the client has sent its bytes
//! and closed its side. The original destination refuses connections, so requests that get
//! through end as 503 (and opaque streams as a reset) quickly.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use comb_model::l7::ProxyTable;
use comb_proxy::telemetry::{Telemetry, TelemetryOptions};
use comb_proxy::{Limits, ProxyContext, ProxyOptions, serve_connection};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

struct Env {
    rt: Runtime,
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    dst: SocketAddr,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tel = Telemetry::new(TelemetryOptions {
            access_log: None,
            otlp_endpoint: None,
            node: "fuzz".into(),
            service_name: "comb-proxy".into(),
            max_stats_routes: 10,
        });
        let mut opts = ProxyOptions::new(tel);
        opts.detect_timeout = Duration::from_millis(20);
        opts.limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            max_body_bytes: 1 << 16,
            ..Limits::default()
        };
        let ctx = ProxyContext::new(&opts, Arc::new(ProxyTable::default()));
        let (listener, dst) = rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            // Bound then dropped: nothing listens there.
            let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
            (l, closed.local_addr().unwrap())
        });
        Env { rt, ctx, listener, dst }
    })
}

fuzz_target!(|data: &[u8]| {
    let e = env();
    e.rt.block_on(async {
        let addr = e.listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), e.listener.accept());
        let mut client = client.unwrap();
        let (server, peer) = accepted.unwrap();
        let task = tokio::spawn(serve_connection(server, peer, e.dst, e.ctx.clone()));
        // The proxy may close early (400, reset): write errors are expected.
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut sink)).await;
        drop(client);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => panic!("connection task failed: {err}"),
            Err(_) => panic!("connection task still running 5 s after the client closed"),
        }
    });
});
