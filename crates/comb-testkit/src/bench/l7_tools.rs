//! What `comb bench l7` drives and reads: h2load runs inside a pod (summary and per-request
//! log), haproxy sidecar configurations, and a process's CPU time and resident memory from
//! /proc.

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use comb_lab::Lab;

use super::report::percentile;

/// One h2load run's summary (its stdout).
#[derive(Debug, Clone, PartialEq)]
pub struct H2load {
    pub done: u64,
    pub status_2xx: u64,
    pub failed: u64,
    pub errored: u64,
    pub req_per_sec: f64,
}

/// Read h2load's `finished in ...`, `requests: ...` and `status codes: ...` lines.
pub fn parse_h2load(text: &str) -> Result<H2load> {
    // "requests: 3008 total, 3008 started, 3008 done, 3008 succeeded, 0 failed, ..."
    let field = |line: &str, what: &str| -> Option<u64> {
        line.split(',').map(str::trim).find_map(|f| {
            f.strip_suffix(what)?
                .trim()
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
    };
    let mut out = H2load {
        done: 0,
        status_2xx: 0,
        failed: 0,
        errored: 0,
        req_per_sec: f64::NAN,
    };
    let (mut requests, mut status) = (false, false);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            out.req_per_sec = rest
                .split(',')
                .map(str::trim)
                .find_map(|f| f.strip_suffix(" req/s")?.parse().ok())
                .unwrap_or(f64::NAN);
        } else if line.starts_with("requests:") {
            requests = true;
            out.done = field(line, " done").context("h2load: no `done` count")?;
            out.failed = field(line, " failed").context("h2load: no `failed` count")?;
            out.errored = field(line, " errored").context("h2load: no `errored` count")?;
        } else if line.starts_with("status codes:") {
            status = true;
            out.status_2xx = field(line, " 2xx").context("h2load: no 2xx count")?;
        }
    }
    if !requests || !status {
        bail!("not h2load output: {}", text.trim());
    }
    Ok(out)
}

/// Per-request latencies in microseconds from h2load's `--log-file` (start µs, status,
/// µs until the end of the response); any status other than 200 is an error.
pub fn parse_h2load_log(text: &str) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 3 {
            bail!("h2load log line {line:?}");
        }
        if f[1] != "200" {
            bail!("a request got status {} (h2load log line {line:?})", f[1]);
        }
        v.push(
            f[2].parse::<f64>()
                .with_context(|| format!("h2load log {line:?}"))?,
        );
    }
    Ok(v)
}

/// h2load --h1 from `pod` to `url` over `conns` connections for `secs`; `rate` is the total
/// requests/s, spread evenly over the connections (h2load's `--rps` is per connection and
/// takes fractions), or None to saturate. With `log`, per-request latencies go there.
/// Any request that fails or gets a non-2xx answer fails the run.
pub fn h2load(
    lab: &Lab,
    pod: &str,
    url: &str,
    conns: usize,
    rate: Option<f64>,
    secs: u32,
    log: Option<&Path>,
) -> Result<H2load> {
    let mut args: Vec<String> = vec![
        "--h1".into(),
        "-c".into(),
        conns.to_string(),
        "-t".into(),
        "1".into(),
        "-D".into(),
        secs.to_string(),
    ];
    if let Some(r) = rate {
        args.push(format!("--rps={}", r / conns as f64));
    }
    if let Some(log) = log {
        let _ = std::fs::remove_file(log);
        args.push(format!("--log-file={}", log.display()));
    }
    args.push(url.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab
        .command(pod, "h2load", &args)?
        .output()
        .context("running h2load (is it installed? `make deps`)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let r = parse_h2load(&text).with_context(|| stderr_of(&out))?;
    if !out.status.success() || r.done == 0 || r.failed + r.errored > 0 || r.status_2xx != r.done {
        bail!("h2load against {url} had errors: {r:?}\n{}", text.trim());
    }
    Ok(r)
}

fn stderr_of(out: &Output) -> String {
    format!(
        "h2load stderr: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// (p50, p99) in milliseconds of an h2load `--log-file`.
pub fn log_p50_p99_ms(log: &Path) -> Result<(f64, f64)> {
    let mut v = parse_h2load_log(&std::fs::read_to_string(log)?)?;
    if v.is_empty() {
        bail!("h2load logged no request in {}", log.display());
    }
    Ok((
        percentile(&mut v, 50.0) / 1000.0,
        percentile(&mut v, 99.0) / 1000.0,
    ))
}

/// Shared part of both haproxy sidecars: HTTP mode, keep-alive on both sides, upstream
/// connections reused across downstream ones (`http-reuse always`, as Envoy pools them),
/// `nbthread 2` (Istio's default sidecar concurrency, and the node proxy's default workers).
pub const HAPROXY_COMMON: &str = "global
  nbthread 2
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 30s
";

/// The client-side sidecar: 127.0.0.1:`listen` in the client pod → the server pod's sidecar.
pub fn haproxy_client_cfg(listen: u16, upstream: &str) -> String {
    format!(
        "{HAPROXY_COMMON}frontend outbound
  bind 127.0.0.1:{listen}
  default_backend peer
backend peer
  http-reuse always
  server peer {upstream}
"
    )
}

/// The server-side sidecar: `:listen` in the server pod → 127.0.0.1:`app`, with the same
/// check as the bench's AuthorizationPolicy (GET, path under /bytes/; else 403).
pub fn haproxy_server_cfg(listen: u16, app: u16) -> String {
    format!(
        "{HAPROXY_COMMON}frontend inbound
  bind :{listen}
  http-request deny unless METH_GET {{ path_beg /bytes/ }}
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:{app}
"
    )
}

/// utime + stime of a whole process (all threads), in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(stat_ticks(&text).with_context(|| format!("/proc/{pid}/stat: {text}"))? as f64 / hz())
}

/// utime + stime of the threads of `pid` named `comm`, in seconds.
pub fn thread_cpu_secs(pid: u32, comm: &str) -> Result<f64> {
    let mut ticks = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = t?.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.trim_end() == comm
            && let Ok(stat) = std::fs::read_to_string(dir.join("stat"))
        {
            ticks += stat_ticks(&stat).unwrap_or(0);
        }
    }
    Ok(ticks as f64 / hz())
}

fn hz() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// utime + stime (fields 14 and 15) of a /proc stat line; the command name in parentheses
/// may hold spaces, so fields are counted after its closing parenthesis.
fn stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 (state) is f[0], so field n is f[n - 3].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The largest sum of VmRSS over `pids` seen every 50 ms while `work` runs, in MiB.
pub fn max_rss_during<T>(pids: &[u32], work: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| -> Result<u64> {
            let mut max = 0;
            loop {
                let mut sum = 0;
                for &p in pids {
                    sum += rss_kib(p)?;
                }
                max = max.max(sum);
                if stop.load(Ordering::Relaxed) {
                    return Ok(max);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let r = work();
        stop.store(true, Ordering::Relaxed);
        let max = sampler.join().expect("rss sampler thread")?;
        Ok((r?, max as f64 / 1024.0))
    })
}

/// The pid of the first node's combd.
pub fn combd_pid(lab: &Lab) -> Result<u32> {
    let node = lab.nodes().first().context("lab has no node")?;
    combd_pid_of(lab, &node.name)
}

/// The pid of `node`'s combd (the only process in its agent cgroup).
pub fn combd_pid_of(lab: &Lab, node: &str) -> Result<u32> {
    let node = lab
        .nodes()
        .iter()
        .find(|n| n.name == node)
        .with_context(|| format!("lab has no node {node}"))?;
    let procs = node
        .cgroup
        .join(comb_lab::naming::AGENT_CGROUP)
        .join("cgroup.procs");
    let text =
        std::fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
    let pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    match pids[..] {
        [pid] => Ok(pid),
        _ => bail!("expected one combd in {}, found {pids:?}", procs.display()),
    }
}

/// `curl` in `pod`; the HTTP status of `method url`.
pub fn http_status(lab: &Lab, pod: &str, method: &str, url: &str) -> Result<u16> {
    let out = lab
        .command(
            pod,
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-m",
                "5",
                "-X",
                method,
                "-w",
                "%{http_code}",
                url,
            ],
        )?
        .output()
        .context("running curl")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("curl {method} {url}: {}", stderr_of(&out)))
}

/// iperf3 (one stream, `secs`) from `pod` to `server`: (bytes the sender wrote, bytes the
/// receiver got within the test).
pub fn iperf3_bytes(lab: &Lab, pod: &str, server: &str, secs: u32) -> Result<(u64, u64)> {
    let v = super::tools::iperf3_json(lab, pod, server, secs)?;
    let bytes = |k: &str| {
        v["end"][k]["bytes"]
            .as_u64()
            .with_context(|| format!("iperf3: no {k}"))
    };
    Ok((bytes("sum_sent")?, bytes("sum_received")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H2LOAD_OUT: &str = "starting benchmark...
finished in 3.00s, 1002.67 req/s, 1.05MB/s
requests: 3008 total, 3008 started, 3008 done, 3006 succeeded, 2 failed, 0 errored, 0 timeout
status codes: 3006 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 3.16MB (3314816) total
";

    #[test]
    fn parses_h2load_summary() {
        let r = parse_h2load(H2LOAD_OUT).unwrap();
        assert_eq!(
            (r.done, r.status_2xx, r.failed, r.errored),
            (3008, 3006, 2, 0)
        );
        assert_eq!(r.req_per_sec, 1002.67);
        assert!(parse_h2load("connect: Connection refused").is_err());
    }

    #[test]
    fn parses_h2load_log_and_rejects_errors() {
        let ok = "1795286071746077\t200\t1431\n1795286071746084\t200\t2041\n";
        assert_eq!(parse_h2load_log(ok).unwrap(), vec![1431.0, 2041.0]);
        assert!(parse_h2load_log("1795286071746077\t403\t99\n").is_err());
    }

    #[test]
    fn stat_ticks_skips_the_command_name() {
        let line = "42 (comb proxy) S 1 42 42 0 -1 4194560 100 0 0 0 250 17 0 0 20 0 5 0 1 2 3";
        assert_eq!(stat_ticks(line), Some(267));
    }

    #[test]
    fn own_process_has_cpu_and_rss() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_secs(me).unwrap() >= 0.0);
        let (v, mib) = max_rss_during(&[me], || Ok(7)).unwrap();
        assert_eq!(v, 7);
        assert!(mib > 0.0);
    }

    #[test]
    fn server_sidecar_denies_like_the_policy() {
        let s = haproxy_server_cfg(15006, 8080);
        assert!(s.contains("bind :15006"));
        assert!(s.contains("http-request deny unless METH_GET { path_beg /bytes/ }"));
        assert!(s.contains("server app 127.0.0.1:8080"));
        let c = haproxy_client_cfg(15001, "198.18.1.4:15006");
        assert!(c.contains("bind 127.0.0.1:15001") && c.contains("server peer 198.18.1.4:15006"));
        assert!(!c.contains("deny"));
    }
}
