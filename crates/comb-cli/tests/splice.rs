//! End-to-end tests of the local socket splice, in a lab with a real agent, real sockets and
//! real veths (privileged: run as root; under CI=true without root they fail).

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::*;

fn two_pods() -> String {
    pod("t", "client", "node1", &[]) + &pod("t", "server", "node1", &[])
}

const SIZES: &str = "1,2,100,1460,4096,65535,65536,65537,1048576,4194304,16777216";

#[test]
fn payloads_are_intact_with_and_without_splice() {
    if !privileged() {
        return;
    }
    let lab = lab_up("sp", &two_pods(), &[]);
    wait_ready(&lab, "node1", 2);
    let _srv = serve(&lab, "t/server", 7000, "echo");
    let to = format!("{}:7000", ip(&lab, "t/server"));
    let sizes: Vec<u64> = SIZES.split(',').map(|s| s.parse().unwrap()).collect();
    let total_each_way: u64 = (0..200).map(|i| sizes[i % sizes.len()]).sum();
    for on in [false, true] {
        set_splice(&lab, "node1", on);
        let before = splice_stats(&lab, "node1");
        let (ok, out) = probe(
            &lab,
            "t/client",
            &[
                "check", "--to", &to, "--conns", "200", "--sizes", SIZES, "--seed", "7",
            ],
        );
        assert!(ok, "splice {on}: payload check failed: {out}");
        let after = splice_stats(&lab, "node1");
        let redirected = after.redirected_bytes - before.redirected_bytes;
        if on {
            // Both directions (request and echo) went socket to socket.
            assert!(
                redirected >= 2 * total_each_way * 95 / 100,
                "splice on redirected only {redirected} of {} bytes",
                2 * total_each_way
            );
        } else {
            assert_eq!(redirected, 0, "splice off must not redirect");
        }
    }
}

/// What a client observes in the half-close, RST and peer-exit scenarios.
fn outcomes(lab: &comb_lab::Lab) -> Vec<String> {
    let server = ip(lab, "t/server");
    let mut seen = Vec::new();
    {
        let _echo = serve(lab, "t/server", 7100, "echo");
        let (ok, out) = probe(
            lab,
            "t/client",
            &[
                "outcome",
                "--to",
                &format!("{server}:7100"),
                "--scenario",
                "half-close",
            ],
        );
        assert!(ok, "{out}");
        seen.push(out.trim().to_string());
    }
    {
        let _reset = serve(lab, "t/server", 7101, "reset");
        let (ok, out) = probe(
            lab,
            "t/client",
            &[
                "outcome",
                "--to",
                &format!("{server}:7101"),
                "--scenario",
                "reset",
            ],
        );
        assert!(ok, "{out}");
        seen.push(out.trim().to_string());
    }
    {
        let hold = serve(lab, "t/server", 7102, "hold");
        let mut client = lab
            .command(
                "t/client",
                COMB,
                &[
                    "probe",
                    "outcome",
                    "--to",
                    &format!("{server}:7102"),
                    "--scenario",
                    "peer-exit",
                ],
            )
            .unwrap()
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut r = BufReader::new(client.stdout.take().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "waiting");
        // Once the server has read everything, it dies with the connection open.
        let mut hold = hold;
        let mut got = String::new();
        BufReader::new(hold.0.stdout.as_mut().unwrap())
            .read_line(&mut got)
            .unwrap();
        assert_eq!(got.trim(), "read 10");
        drop(hold);
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(client.wait().unwrap().success());
        seen.push(line.trim().to_string());
    }
    seen
}

#[test]
fn half_close_reset_and_peer_exit_behave_as_plain_tcp() {
    if !privileged() {
        return;
    }
    let lab = lab_up("so", &two_pods(), &[]);
    wait_ready(&lab, "node1", 2);
    set_splice(&lab, "node1", false);
    let plain = outcomes(&lab);
    set_splice(&lab, "node1", true);
    let before = splice_stats(&lab, "node1").redirected_bytes;
    let spliced = outcomes(&lab);
    assert!(
        splice_stats(&lab, "node1").redirected_bytes > before,
        "scenarios did not run spliced"
    );
    assert_eq!(plain[0], "echoed:1000 intact:true then:eof");
    assert!(
        plain[1].starts_with("read:reset") || plain[1].starts_with("read:eof"),
        "{plain:?}"
    );
    assert_eq!(plain, spliced, "splice changed what the client observes");
}

#[test]
fn spliced_bytes_do_not_cross_the_veth() {
    if !privileged() {
        return;
    }
    let lab = lab_up("sv", &two_pods(), &[]);
    wait_ready(&lab, "node1", 2);
    let _srv = serve(&lab, "t/server", 7200, "echo");
    let to = format!("{}:7200", ip(&lab, "t/server"));
    const N: u64 = 8 << 20;
    for on in [false, true] {
        set_splice(&lab, "node1", on);
        let (rx0, tx0) = veth_bytes(&lab, "t/client");
        let (ok, out) = probe(
            &lab,
            "t/client",
            &[
                "check",
                "--to",
                &to,
                "--conns",
                "1",
                "--sizes",
                &N.to_string(),
            ],
        );
        assert!(ok, "{out}");
        let (rx1, tx1) = veth_bytes(&lab, "t/client");
        // The host side receives what the client sends and transmits the echo.
        let crossed = (rx1 - rx0) + (tx1 - tx0);
        if on {
            // Handshake, FIN and ACKs only.
            assert!(
                crossed < 64 * 1024,
                "splice on: {crossed} bytes crossed the veth"
            );
        } else {
            assert!(
                crossed >= 2 * N,
                "splice off: only {crossed} bytes crossed the veth"
            );
        }
    }
}

#[test]
fn sockhash_is_empty_after_ten_thousand_connections() {
    if !privileged() {
        return;
    }
    let lab = lab_up("sl", &two_pods(), &[]);
    wait_ready(&lab, "node1", 2);
    let _srv = serve(&lab, "t/server", 7300, "echo");
    let before = splice_stats(&lab, "node1");
    let (ok, out) = probe(
        &lab,
        "t/client",
        &[
            "churn",
            "--to",
            &format!("{}:7300", ip(&lab, "t/server")),
            "--count",
            "10000",
        ],
    );
    assert!(ok, "{out}");
    let after = splice_stats(&lab, "node1");
    assert!(
        after.sockets_added - before.sockets_added >= 20_000,
        "both ends of every connection enter the map: {after:?}"
    );
    wait_for(
        std::time::Duration::from_secs(10),
        "sockhash to drain",
        || splice_stats(&lab, "node1").sockets == 0,
    );
}

#[test]
fn opted_out_and_remote_pods_keep_the_tcp_path() {
    if !privileged() {
        return;
    }
    let pods = pod("t", "client", "node1", &[])
        + &pod("t", "legacy", "node1", &[("comb.dev/splice", "off")])
        + &pod("t", "far", "node2", &[]);
    let lab = lab_up("sr", &pods, &[]);
    wait_ready(&lab, "node1", 1);
    wait_ready(&lab, "node2", 1);
    let rows = endpoints(&lab, "node1");
    let legacy = rows.iter().find(|r| r.pod == "legacy").unwrap();
    assert!(!legacy.splice && legacy.cgroup.is_none(), "{legacy:?}");
    for target in ["t/legacy", "t/far"] {
        let _srv = serve(&lab, target, 7400, "echo");
        let before = splice_stats(&lab, "node1");
        let (ok, out) = probe(
            &lab,
            "t/client",
            &[
                "check",
                "--to",
                &format!("{}:7400", ip(&lab, target)),
                "--sizes",
                "100000",
            ],
        );
        assert!(ok, "{target}: {out}");
        let after = splice_stats(&lab, "node1");
        assert_eq!(
            after.redirected_bytes, before.redirected_bytes,
            "{target} must not be spliced"
        );
        assert_eq!(
            after.sockets_added, before.sockets_added,
            "{target}: no socket enters the map"
        );
    }
}
