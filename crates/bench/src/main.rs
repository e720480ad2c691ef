//! `blindpost-bench`: the load tool. Sets up simulated devices and conversations through the
//! real client library (real MLS, post-quantum suite), pre-encrypts a pool of application
//! messages, then drives a running `blindpostd` over the wire protocol for a measured window
//! and prints a JSON summary as its last line; optionally runs the equivalent durable workload
//! on NATS JetStream in the same run and reports the ratio. A connection-hold mode measures
//! the server's memory per idle subscribed connection. Flags and glue only: the work lives in
//! `setup.rs`, `relay.rs`, `jetstream.rs`, `hold.rs` and `stats.rs`.

#![forbid(unsafe_code)]

mod hold;
mod jetstream;
mod relay;
mod setup;
mod stats;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use blindpost_client::{RelaySettings, ServerSettings};
use clap::Parser;
use serde::Serialize;

use relay::{Counters, Pacing};
use stats::Percentiles;

/// Drive blindpostd with simulated devices (real MLS ciphertexts) and report throughput,
/// latency and server resources; optionally side by side with NATS JetStream.
#[derive(Parser)]
#[command(name = "blindpost-bench", version)]
struct Args {
    /// Server URL (`ws://host:port` or `wss://host:port`); repeat to spread devices over
    /// several nodes.
    #[arg(long, value_name = "URL", required_unless_present = "spawn_server")]
    server: Vec<String>,
    /// Certificate pin (`sha256:HEX`, the server's `tls certificate` line) for every
    /// `wss://` server; repeatable.
    #[arg(long, value_name = "PIN")]
    server_pin: Vec<String>,
    /// A relay (`wss://host:port/PATH`) every server is also reached through, tried after the
    /// direct path as the client does; repeatable.
    #[arg(long, value_name = "URL")]
    relay: Vec<String>,
    /// The pin of a relay's certificate: the n-th `--relay-pin` goes with the n-th `--relay`.
    #[arg(long, value_name = "PIN", requires = "relay")]
    relay_pin: Vec<String>,
    /// Start this `blindpostd` binary on 127.0.0.1 with a fresh data directory and the
    /// per-connection request rate limit lifted, measure it (start-to-ready, idle RSS, CPU,
    /// RSS) and stop it at the end, instead of --server.
    #[arg(long, value_name = "PATH", conflicts_with = "server")]
    spawn_server: Option<PathBuf>,
    /// With --spawn-server: start it with `--tls self-signed` (admin listener on a free
    /// port) and connect over `wss://` with the pin it prints.
    #[arg(long, requires = "spawn_server")]
    spawn_tls: bool,
    /// PID of a server process to measure (CPU, RSS from /proc); repeat for several nodes.
    #[arg(long, value_name = "PID")]
    server_pid: Vec<u32>,
    /// Number of conversations (1:1 pairs, or groups with --group-size).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pairs: usize,
    /// Devices per conversation: 2 is a 1:1 chat, more a group. One member of each
    /// conversation sends; the others receive.
    #[arg(long, value_name = "K", default_value_t = 2)]
    group_size: usize,
    /// Length of the measured window, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    duration: f64,
    /// Text bytes per application message (the MLS ciphertext is larger: JSON, padding to a
    /// power-of-two bucket, MLS framing; its size is reported as `wire_payload_bytes`).
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    payload: usize,
    /// Open loop: messages per second over all senders, sent at fixed times whatever the
    /// server answers; latency counts from when each post left, and `send_lag_ms` says how
    /// late posts left their schedule. Without it, each sender waits for the answer to each
    /// post (closed loop, the maximum rate).
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Messages each sender encrypts ahead of time; posts cycle through them (only the first
    /// cycle is checked for decryption, later cycles are replays to MLS).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pool: usize,
    /// Check every Nth message of the first cycle decrypts at its receivers.
    #[arg(long, value_name = "N", default_value_t = 20)]
    sample_every: usize,
    /// Receivers whose samples are decrypted after the window (each opens its profile).
    #[arg(long, value_name = "N", default_value_t = 20)]
    check_receivers: usize,
    /// Run the same workload on NATS JetStream (file storage, acked) and report the ratio.
    #[arg(long, value_name = "URL")]
    compare_jetstream: Option<String>,
    /// PID of the nats-server process, to report its CPU time per message beside the server's.
    #[arg(long, value_name = "PID", requires = "compare_jetstream")]
    jetstream_pid: Option<u32>,
    /// Connection-hold mode: open this many idle subscribed connections (0: as many as the
    /// file-descriptor limit allows) and report server RSS per connection.
    #[arg(long, value_name = "N")]
    hold: Option<usize>,
    /// Setup threads (each runs several conversations' setup at once).
    #[arg(long, value_name = "N", default_value_t = 4)]
    setup_threads: usize,
    /// Conversations set up at once per setup thread.
    #[arg(long, value_name = "N", default_value_t = 4)]
    setup_concurrency: usize,
    /// Where device profiles go (default: a temporary directory, removed at exit).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Print the summary as JSON (the last line of output).
    #[arg(long)]
    json: bool,
}

/// The name blindpostd gives its SQLite writer thread (`store/sqlite.rs`): the thread whose
/// CPU time per message `server_writer_cpu_us_per_message` reports.
const WRITER_THREAD: &str = "sqlite-writer";

/// The summary of a load run (the contract scripts rely on).
#[derive(Serialize)]
struct Summary {
    mode: &'static str,
    servers: Vec<String>,
    /// The relays every server was also reached through (`--relay`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    relays: Vec<String>,
    conversations: usize,
    group_size: usize,
    devices: usize,
    pacing: String,
    duration_secs: f64,
    payload_bytes: usize,
    wire_payload_bytes: usize,
    setup_secs: f64,
    posted: u64,
    delivered: u64,
    delivered_total: u64,
    delivered_per_sec: f64,
    latency_ms: Percentiles,
    /// Open loop: how late posts left their scheduled times (latency counts from when they
    /// left). The tool's timer ticks in whole milliseconds; much more means the tool was
    /// starved of CPU and the offered rate fell short.
    #[serde(skip_serializing_if = "Option::is_none")]
    send_lag_ms: Option<Percentiles>,
    echoes: u64,
    errors: u64,
    decrypt_checked: usize,
    decrypt_failed: usize,
    server_cpu_percent: Option<f64>,
    /// Server CPU time from the window's start until every delivery was counted, per message
    /// delivered in that time: steadier than `delivered_per_sec` where the machine is shared.
    server_cpu_us_per_message: Option<f64>,
    /// The same for the SQLite writer thread alone (absent on PostgreSQL).
    #[serde(skip_serializing_if = "Option::is_none")]
    server_writer_cpu_us_per_message: Option<f64>,
    /// This tool's own CPU time over the same span, per delivered message: it shares the
    /// machine with the server, so what it spends the server does not get.
    tool_cpu_us_per_message: f64,
    server_peak_rss_kib: Option<u64>,
    server_hwm_rss_kib: Option<u64>,
    server_start_to_ready_ms: Option<f64>,
    server_idle_rss_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jetstream_delivered_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jetstream_latency_ms: Option<Percentiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jetstream_errors: Option<u64>,
    /// nats-server's CPU time per delivered message (with `--jetstream-pid`), to set beside
    /// `server_cpu_us_per_message`.
    #[serde(skip_serializing_if = "Option::is_none")]
    jetstream_server_cpu_us_per_message: Option<f64>,
    /// This tool's CPU time per delivered message during the JetStream window.
    #[serde(skip_serializing_if = "Option::is_none")]
    jetstream_tool_cpu_us_per_message: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blindpost-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A server this tool started.
struct Spawned {
    child: Child,
    _data: tempfile::TempDir,
    ready_ms: f64,
    idle_rss_kib: u64,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server this tool started, and the settings to reach it.
struct SpawnedAt {
    server: Spawned,
    url: String,
    /// With TLS: the pin of its self-signed certificate.
    pin: Option<String>,
}

fn spawn_server(bin: &PathBuf, tls: bool) -> Result<SpawnedAt> {
    let data = tempfile::tempdir()?;
    // The per-connection rate limits guard against abusive clients; a load test's senders
    // would hit the request limit and measure it instead of the relay, and a group's creator
    // claims a key package for every member on one connection.
    let config = data.path().join("bench.toml");
    std::fs::write(
        &config,
        "requests_per_second = 1000000\nrequest_burst = 1000000\n\
         claims_per_minute = 1000000\nclaim_burst = 1000000\n",
    )?;
    let started = Instant::now();
    let mut command = Command::new(bin);
    command
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(data.path().join("data"))
        .args(["--max-connections", "1000000", "--log", "warn"]);
    if tls {
        // With TLS, /healthz and /metrics move to an admin listener (default 127.0.0.1:7481,
        // which two spawned servers would both want).
        command.args(["--tls", "self-signed", "--admin-listen", "127.0.0.1:0"]);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from the server"))?;
    let mut stdout = BufReader::new(stdout);
    let mut next_line = |what: &str| -> Result<String> {
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let line = line.trim();
        line.strip_prefix(what)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("expected {what:?}… from the server, got {line:?}"))
    };
    let addr = next_line("blindpostd listening on ")?;
    let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    let pin = if tls {
        let pin = next_line("tls certificate ")?;
        next_line("blindpostd admin listening on ")?;
        Some(pin)
    } else {
        None
    };
    // Keep reading whatever else it prints, so a later line never meets a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let idle_rss_kib = stats::sample(child.id())?.rss_kib;
    let scheme = if tls { "wss" } else { "ws" };
    Ok(SpawnedAt {
        server: Spawned {
            child,
            _data: data,
            ready_ms,
            idle_rss_kib,
        },
        url: format!("{scheme}://{addr}"),
        pin,
    })
}

/// The settings of every server from the flags: each URL with every `--server-pin` and every
/// `--relay` (the n-th `--relay-pin` with the n-th relay).
fn server_settings(args: &Args) -> Result<Vec<ServerSettings>> {
    if args.relay_pin.len() > args.relay.len() {
        bail!("more --relay-pin than --relay (the n-th pin goes with the n-th relay)");
    }
    let relays: Vec<RelaySettings> = args
        .relay
        .iter()
        .enumerate()
        .map(|(i, url)| {
            RelaySettings::new(url, args.relay_pin.get(i).cloned().into_iter().collect())
        })
        .collect();
    args.server
        .iter()
        .map(|url| {
            let mut s = ServerSettings::new(url);
            s.pins = args.server_pin.clone();
            s.relays = relays.clone();
            s.check()
                .with_context(|| format!("the settings of {url}"))?;
            Ok(s)
        })
        .collect()
}

fn run(mut args: Args) -> Result<()> {
    if args.pairs == 0 || args.group_size < 2 {
        bail!("--pairs must be at least 1 and --group-size at least 2");
    }
    if args.pool == 0 || args.duration.is_nan() || args.duration <= 0.0 {
        bail!("--pool and --duration must be positive");
    }
    if let Some(r) = args.rate
        && (r.is_nan() || r <= 0.0)
    {
        bail!("--rate must be positive");
    }
    let spawned = match &args.spawn_server {
        Some(bin) => {
            let at = spawn_server(bin, args.spawn_tls)?;
            args.server = vec![at.url];
            args.server_pin.extend(at.pin);
            args.server_pid.push(at.server.child.id());
            Some(at.server)
        }
        None => None,
    };
    let servers = server_settings(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary_json = if let Some(n) = args.hold {
        let want = (n > 0).then_some(n);
        let summary = rt.block_on(hold::run(
            &servers,
            &args.server_pid,
            want,
            Duration::from_secs(2),
        ))?;
        serde_json::to_string(&summary)?
    } else {
        let summary = load(&args, &servers, &rt, spawned.as_ref())?;
        if !args.json {
            print_human(&summary);
        }
        serde_json::to_string(&summary)?
    };
    drop(spawned);
    println!("{summary_json}");
    Ok(())
}

fn load(
    args: &Args,
    servers: &[ServerSettings],
    rt: &tokio::runtime::Runtime,
    spawned: Option<&Spawned>,
) -> Result<Summary> {
    let temp;
    let root = match &args.work_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let mut run_id = [0u8; 4];
    getrandom::fill(&mut run_id).map_err(|e| anyhow!("OS random source: {e}"))?;
    let run_id: String = run_id.iter().map(|b| format!("{b:02x}")).collect();
    let plan = setup::Plan {
        servers: servers.to_vec(),
        conversations: args.pairs,
        group_size: args.group_size,
        pool: args.pool,
        text_len: args.payload,
        threads: args.setup_threads,
        concurrency: args.setup_concurrency,
    };
    let setup_started = Instant::now();
    let convs = setup::run(&plan, &root, &run_id)?;
    let setup_secs = setup_started.elapsed().as_secs_f64();
    let wire_payload_bytes = convs
        .first()
        .and_then(|c| c.pool.first())
        .map_or(0, Vec::len);
    let pacing = match args.rate {
        Some(rate) => Pacing::Open { rate },
        None => Pacing::Closed,
    };
    let duration = Duration::from_secs_f64(args.duration);
    let drain = Duration::from_secs(5);

    // blindpost's window, with the server sampled alongside.
    let counters = Arc::new(Counters::default());
    let tool_before = own_cpu_ticks();
    let before = stats::sample_all(&args.server_pid);
    let writer_before = stats::thread_ticks_all(&args.server_pid, WRITER_THREAD);
    let (outcome, peak_rss) = rt.block_on(async {
        let progress = tokio::spawn(progress(counters.clone(), "blindpost"));
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = tokio::spawn(sample_peak(args.server_pid.clone(), peak.clone()));
        let outcome = relay::run(
            &convs,
            duration,
            drain,
            pacing,
            args.sample_every,
            counters.clone(),
        )
        .await;
        progress.abort();
        sampler.abort();
        (outcome, peak.load(Ordering::Relaxed))
    });
    let mut outcome = outcome?;
    let after = stats::sample_all(&args.server_pid);
    let tool_secs = ticks_to_secs(own_cpu_ticks().saturating_sub(tool_before));
    let writer_after = stats::thread_ticks_all(&args.server_pid, WRITER_THREAD);
    let measured = !args.server_pid.is_empty();
    let server_secs = ticks_to_secs(after.cpu_ticks.saturating_sub(before.cpu_ticks));
    let per_delivered = |secs: f64| per_message(secs, outcome.delivered_total);
    let server_cpu_percent = measured.then(|| server_secs / args.duration * 100.0);
    let server_cpu_us_per_message = measured.then(|| per_delivered(server_secs));
    let server_writer_cpu_us_per_message = writer_before
        .zip(writer_after)
        .map(|(b, a)| per_delivered(ticks_to_secs(a.saturating_sub(b))));

    // Decryption check through the real client, after the window.
    let (decrypt_checked, decrypt_failed) = check_samples(&convs, &outcome, args.check_receivers)?;

    let delivered_per_sec = outcome.delivered_in_window as f64 / args.duration;
    let mut summary = Summary {
        mode: "load",
        servers: args.server.clone(),
        relays: args.relay.clone(),
        conversations: args.pairs,
        group_size: args.group_size,
        devices: args.pairs * args.group_size,
        pacing: match pacing {
            Pacing::Closed => "closed".into(),
            Pacing::Open { rate } => format!("open {rate}/s"),
        },
        duration_secs: args.duration,
        payload_bytes: args.payload,
        wire_payload_bytes,
        setup_secs,
        posted: outcome.posted,
        delivered: outcome.delivered_in_window,
        delivered_total: outcome.delivered_total,
        delivered_per_sec,
        latency_ms: outcome.latencies.percentiles(),
        send_lag_ms: match pacing {
            Pacing::Closed => None,
            Pacing::Open { .. } => Some(outcome.send_lag.percentiles()),
        },
        echoes: outcome.echoes,
        errors: outcome.errors,
        decrypt_checked,
        decrypt_failed,
        server_cpu_percent,
        server_cpu_us_per_message,
        server_writer_cpu_us_per_message,
        tool_cpu_us_per_message: per_delivered(tool_secs),
        server_peak_rss_kib: measured.then_some(peak_rss.max(after.rss_kib)),
        server_hwm_rss_kib: measured.then_some(after.hwm_kib),
        server_start_to_ready_ms: spawned.map(|s| s.ready_ms),
        server_idle_rss_kib: spawned.map(|s| s.idle_rss_kib),
        jetstream_delivered_per_sec: None,
        jetstream_latency_ms: None,
        jetstream_errors: None,
        jetstream_server_cpu_us_per_message: None,
        jetstream_tool_cpu_us_per_message: None,
        ratio: None,
    };
    drop(convs);

    if let Some(url) = &args.compare_jetstream {
        let counters = Arc::new(Counters::default());
        let tool_before = own_cpu_ticks();
        let nats_before = args
            .jetstream_pid
            .map(|pid| stats::sample_all(&[pid]).cpu_ticks);
        let js = rt.block_on(async {
            let progress = tokio::spawn(progress(counters.clone(), "jetstream"));
            let r = jetstream::run(
                url,
                args.pairs * (args.group_size - 1),
                wire_payload_bytes,
                duration,
                drain,
                pacing,
                counters.clone(),
            )
            .await;
            progress.abort();
            r
        })?;
        let delivered = counters.delivered.load(Ordering::Relaxed);
        let tool_secs = ticks_to_secs(own_cpu_ticks().saturating_sub(tool_before));
        summary.jetstream_tool_cpu_us_per_message = Some(per_message(tool_secs, delivered));
        summary.jetstream_server_cpu_us_per_message =
            args.jetstream_pid.zip(nats_before).map(|(pid, before)| {
                let after = stats::sample_all(&[pid]).cpu_ticks;
                per_message(ticks_to_secs(after.saturating_sub(before)), delivered)
            });
        let mut lat = js.latencies;
        let js_rate = js.delivered_in_window as f64 / args.duration;
        summary.jetstream_delivered_per_sec = Some(js_rate);
        summary.jetstream_latency_ms = Some(lat.percentiles());
        summary.jetstream_errors = Some(js.errors);
        summary.ratio = (js_rate > 0.0).then(|| delivered_per_sec / js_rate);
        eprintln!("jetstream: {} published", js.published);
    }
    Ok(summary)
}

/// CPU ticks this process has used so far (0 if `/proc` cannot be read).
fn own_cpu_ticks() -> u64 {
    stats::sample(std::process::id()).map_or(0, |s| s.cpu_ticks)
}

fn ticks_to_secs(ticks: u64) -> f64 {
    ticks as f64 / stats::TICKS_PER_SEC
}

/// Microseconds of CPU per delivered message.
fn per_message(cpu_secs: f64, delivered: u64) -> f64 {
    cpu_secs * 1e6 / delivered.max(1) as f64
}

/// Decrypt the sampled payloads at up to `receivers` receiving devices, through the real
/// client. Returns (checked, failed).
fn check_samples(
    convs: &[setup::Conversation],
    outcome: &relay::Outcome,
    receivers: usize,
) -> Result<(usize, usize)> {
    let mut checked = 0;
    let mut failed = 0;
    let mut budget = receivers;
    'outer: for (c, conv) in convs.iter().enumerate() {
        for (m, member) in conv.members.iter().enumerate().skip(1) {
            if budget == 0 {
                break 'outer;
            }
            let samples = &outcome.samples[c][m];
            if samples.is_empty() {
                continue;
            }
            budget -= 1;
            let client = blindpost_client::Client::open(&member.dir)?;
            let opened = client.bench_open(&member.target, samples)?;
            checked += samples.len();
            failed += samples.len() - opened.min(samples.len());
        }
    }
    Ok((checked, failed))
}

async fn progress(counters: Arc<Counters>, label: &'static str) {
    let started = Instant::now();
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let delivered = counters.delivered.load(Ordering::Relaxed);
        eprintln!(
            "[{label} {:>5.1}s] posted {} delivered {} ({}/s) errors {}",
            started.elapsed().as_secs_f64(),
            counters.posted.load(Ordering::Relaxed),
            delivered,
            delivered - last,
            counters.errors.load(Ordering::Relaxed),
        );
        last = delivered;
    }
}

/// Sample the servers' total RSS every 100 ms into `peak` (until aborted).
async fn sample_peak(pids: Vec<u32>, peak: Arc<AtomicU64>) {
    loop {
        peak.fetch_max(stats::sample_all(&pids).rss_kib, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_human(s: &Summary) {
    eprintln!(
        "{} conversations × {} devices, {}, {:.0}s, {} B text ({} B on the wire)",
        s.conversations,
        s.group_size,
        s.pacing,
        s.duration_secs,
        s.payload_bytes,
        s.wire_payload_bytes
    );
    eprintln!(
        "delivered {:.0}/s; latency p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms; errors {}",
        s.delivered_per_sec,
        s.latency_ms.p50,
        s.latency_ms.p99,
        s.latency_ms.p999,
        s.latency_ms.max,
        s.errors
    );
    if let (Some(js), Some(r)) = (s.jetstream_delivered_per_sec, s.ratio) {
        eprintln!("jetstream delivered {js:.0}/s; ratio {r:.2}");
    }
}
