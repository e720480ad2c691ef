//! End-to-end: the real `blindpost-bench` against the real `blindpostd` (which it starts
//! with `--spawn-server`), on a tiny workload. Proves the contract scripts rely on — the JSON
//! summary is the last line and carries the required fields — and that the measured window
//! really moves real MLS messages: everything posted is delivered and the sampled messages
//! decrypt at their receivers. Not a benchmark: no figure is asserted beyond "it worked".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// `blindpostd` from the workspace's target directory (built here if missing).
fn blindpostd() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_blindpost-bench"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join("blindpostd");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "blindpost-server", "--bin", "blindpostd"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building blindpostd failed");
    }
    path
}

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_blindpost-bench"))
        .arg("--spawn-server")
        .arg(blindpostd())
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "blindpost-bench failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

#[test]
fn a_pairs_run_delivers_real_mls_messages_and_ends_with_the_json_summary() {
    let s = bench(&[
        "--pairs",
        "2",
        "--duration",
        "1",
        "--payload",
        "64",
        "--pool",
        "50",
        "--sample-every",
        "5",
        "--json",
    ]);
    assert_eq!(s["errors"], 0, "{s}");
    let posted = s["posted"].as_u64().unwrap();
    assert!(posted > 0, "{s}");
    assert!(s["delivered_per_sec"].as_f64().unwrap() > 0.0, "{s}");
    // Each 1:1 post reaches the receiver; none echoes back to the sender, whose connection
    // reads its own queue (`skip_subscribed`).
    assert_eq!(s["echoes"].as_u64().unwrap(), 0, "{s}");
    assert_eq!(s["delivered_total"].as_u64().unwrap(), posted, "{s}");
    assert!(s["decrypt_checked"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["decrypt_failed"], 0, "{s}");
    for key in ["p50", "p99", "p999", "max"] {
        assert!(s["latency_ms"][key].as_f64().unwrap() > 0.0, "{s}");
    }
    assert!(s["server_peak_rss_kib"].as_u64().unwrap() > 0, "{s}");
    assert!(s["server_start_to_ready_ms"].as_f64().unwrap() > 0.0, "{s}");
    // A closed loop has no schedule to fall behind.
    assert!(s.get("send_lag_ms").is_none(), "{s}");
}

#[test]
fn an_open_loop_group_run_reaches_every_member() {
    let s = bench(&[
        "--pairs",
        "1",
        "--group-size",
        "3",
        "--duration",
        "1",
        "--rate",
        "20",
        "--payload",
        "32",
        "--pool",
        "40",
        "--sample-every",
        "4",
        "--json",
    ]);
    assert_eq!(s["errors"], 0, "{s}");
    let posted = s["posted"].as_u64().unwrap();
    assert!(posted >= 10, "{s}");
    // Two receivers per post, and every post reaches both (counting the drain after the window).
    assert_eq!(s["delivered_total"].as_u64().unwrap(), 2 * posted, "{s}");
    assert_eq!(s["decrypt_failed"], 0, "{s}");
    assert!(s["decrypt_checked"].as_u64().unwrap() >= 2, "{s}");
    // Latency counts from when each post left; how late it left its schedule is reported.
    for key in ["p50", "p99", "p999", "max"] {
        assert!(s["latency_ms"][key].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["send_lag_ms"][key].as_f64().unwrap() >= 0.0, "{s}");
    }
    assert!(
        s["send_lag_ms"]["p50"].as_f64().unwrap() <= s["send_lag_ms"]["max"].as_f64().unwrap(),
        "{s}"
    );
}

#[test]
fn hold_mode_reports_memory_per_connection() {
    let s = bench(&["--hold", "50", "--json"]);
    assert_eq!(s["mode"], "hold");
    assert_eq!(s["connections"], 50, "{s}");
    assert!(
        s["server_rss_per_connection_kib"].as_f64().unwrap() > 0.0,
        "{s}"
    );
}

#[test]
fn a_tls_run_goes_over_wss_with_the_spawned_servers_pin() {
    let s = bench(&[
        "--spawn-tls",
        "--pairs",
        "2",
        "--duration",
        "1",
        "--payload",
        "64",
        "--pool",
        "50",
        "--sample-every",
        "5",
        "--json",
    ]);
    assert!(
        s["servers"][0]
            .as_str()
            .unwrap()
            .starts_with("wss://127.0.0.1:"),
        "{s}"
    );
    assert_eq!(s["errors"], 0, "{s}");
    let posted = s["posted"].as_u64().unwrap();
    assert!(posted > 0, "{s}");
    assert_eq!(s["delivered_total"].as_u64().unwrap(), posted, "{s}");
    assert_eq!(s["decrypt_failed"], 0, "{s}");
}
