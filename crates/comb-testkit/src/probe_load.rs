//! `comb probe http-load`: paced HTTP/1.1 keep-alive requests over several connections,
//! counting every request that does not end in a complete 200 response. Made for upgrade
//! tests: a connection the server ends after a response with `Connection: close` is opened
//! again before the next request (as browsers and client libraries do), so a clean drain
//! costs no request; a request lost on a connection that closed under it is a failure
//! (never retried: retries would hide exactly what the test is after).
//!
//! Prints one JSON object when done: `ok`, `failed`, `connections` (opened), `max_gap_ms`
//! (the longest time in which no request completed), `p50_ms`, `p99_ms`, `errors` (the
//! first few failures, with the time they happened). With `--samples FILE`, also one line per
//! request: its start (unix µs), its latency (µs, or -1 when it failed).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const MAX_ERRORS: usize = 10;

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    connections: u64,
    latencies_us: Vec<u64>,
    /// Completion times (since start) of every successful request, for the gaps.
    done_at_us: Vec<u64>,
    /// (start, unix µs; latency µs or -1 for a failure) of every request.
    samples: Vec<(u64, i64)>,
    errors: Vec<String>,
}

pub fn run(
    to: SocketAddr,
    conns: usize,
    rate: f64,
    secs: f64,
    path: String,
    samples: Option<std::path::PathBuf>,
) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("runtime")?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let conns = conns.max(1);
    // Each connection sends on its own clock, offset so they do not fire together.
    let every = Duration::from_secs_f64(conns as f64 / rate.max(0.001));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..conns {
            let (tally, path) = (tally.clone(), path.clone());
            let start = t0 + every.mul_f64(i as f64 / conns as f64);
            tasks.push(tokio::spawn(connection(
                to, path, start, every, end, t0, tally,
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let mut t = tally.lock().expect("tally");
    if let Some(file) = samples {
        use std::fmt::Write as _;
        let mut text = String::new();
        for (start, lat) in &t.samples {
            let _ = writeln!(text, "{start} {lat}");
        }
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    }
    t.latencies_us.sort_unstable();
    t.done_at_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if t.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((t.latencies_us.len() as f64 * p).ceil() as usize).clamp(1, t.latencies_us.len());
        t.latencies_us[i - 1] as f64 / 1000.0
    };
    let total_us = (end - t0).as_micros() as u64;
    let mut prev = 0u64;
    let mut max_gap = 0u64;
    for &d in t.done_at_us.iter().chain(std::iter::once(&total_us)) {
        max_gap = max_gap.max(d.saturating_sub(prev));
        prev = d;
    }
    println!(
        "{}",
        serde_json::json!({
            "ok": t.ok,
            "failed": t.failed,
            "connections": t.connections,
            "max_gap_ms": max_gap as f64 / 1000.0,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "errors": t.errors,
        })
    );
    Ok(ExitCode::SUCCESS)
}

type Sender = http1::SendRequest<Empty<Bytes>>;

async fn open(to: SocketAddr) -> Result<Sender> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to))
        .await
        .context("connect timed out")?
        .context("connect")?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .context("handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn connection(
    to: SocketAddr,
    path: String,
    start: Instant,
    every: Duration,
    end: Instant,
    t0: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    let mut next = start;
    let mut sender: Option<Sender> = None;
    let unix_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    };
    let fail = |what: String| {
        let mut t = tally.lock().expect("tally");
        t.failed += 1;
        t.samples.push((unix_us(), -1));
        if t.errors.len() < MAX_ERRORS {
            t.errors
                .push(format!("{:.3}s: {what}", t0.elapsed().as_secs_f64()));
        }
    };
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        // A connection the server closed (after `Connection: close`) is reopened first.
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            match open(to).await {
                Ok(s) => {
                    tally.lock().expect("tally").connections += 1;
                    sender = Some(s);
                }
                Err(e) => {
                    fail(format!("{e:#}"));
                    sender = None;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        if s.ready().await.is_err() {
            // Closed between the check and now: not a request yet, reopen next time.
            sender = None;
            next -= every;
            continue;
        }
        let req = Request::get(path.as_str())
            .header("host", to.to_string())
            .body(Empty::new())
            .expect("request");
        let (t, started) = (Instant::now(), unix_us());
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = s.send_request(req).await.context("request")?;
            let status = resp.status();
            let body = resp.into_body().collect().await.context("body")?;
            anyhow::ensure!(status == 200, "status {status}");
            Ok::<_, anyhow::Error>(body.to_bytes().len())
        })
        .await;
        match r {
            Ok(Ok(_)) => {
                let mut tl = tally.lock().expect("tally");
                tl.ok += 1;
                let lat = t.elapsed().as_micros() as u64;
                tl.latencies_us.push(lat);
                tl.samples.push((started, lat as i64));
                tl.done_at_us.push(t0.elapsed().as_micros() as u64);
            }
            Ok(Err(e)) => {
                fail(format!("{e:#}"));
                sender = None;
            }
            Err(_) => {
                fail("no response within 10 s".into());
                sender = None;
            }
        }
    }
}
