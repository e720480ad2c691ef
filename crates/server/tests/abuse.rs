//! Abuse and bad input over a real socket: every configured limit refuses what passes it (and
//! only that), slow-drip clients are dropped, key-package boxes cannot be drained of one-time
//! packages twice, and a flood neither grows the real binary's memory without bound nor stops
//! a legitimate client from being served. Not for: the protocol's happy paths (see `ws.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

fn ping() -> Request {
    Request::Ping(Ping {})
}

fn claim(box_id: u8) -> Request {
    Request::ClaimKeyPackage(ClaimKeyPackage {
        box_id: vec![box_id; 16],
    })
}

fn publish(box_id: u8, count: usize) -> Request {
    Request::PublishKeyPackages(PublishKeyPackages {
        box_id: vec![box_id; 16],
        box_secret: vec![box_id ^ 0x77; 32],
        key_packages: (0..count).map(|i| format!("kp{i}").into_bytes()).collect(),
        last_resort: b"last resort".to_vec(),
    })
}

#[tokio::test]
async fn requests_per_connection_are_rate_limited() {
    let server = start_with(|c| {
        c.request_burst = 5;
        c.requests_per_second = 0;
    })
    .await;
    let mut c = Client::connect(server.addr).await;
    for _ in 0..5 {
        c.ok(ping()).await;
    }
    let e = c.error(ping()).await;
    assert_eq!(e.code(), ErrorCode::LimitExceeded);
    assert!(e.message.contains("too many requests"), "{}", e.message);
    // Garbage counts against the budget too, and is answered, not dropped.
    c.send(Message::binary(vec![0xff; 3])).await;
    let r = c.response().await;
    assert_eq!(r.id, 0);
    let Some(Body::Error(e)) = r.body else {
        panic!("expected an error")
    };
    assert_eq!(e.code(), ErrorCode::LimitExceeded);
    // Another connection has its own budget.
    let mut other = Client::connect(server.addr).await;
    other.ok(ping()).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_queue_holds_at_most_max_queue_bytes_until_acknowledged() {
    let limit = blindpost_wire::limits::MAX_PAYLOAD_BYTES;
    let server = start_with(|c| c.max_queue_bytes = limit as u64).await;
    let mut c = Client::connect(server.addr).await;
    let (a, group, token) = queue_and_group(&mut c).await;
    let big = vec![0x42; limit / 2];
    c.ok(post(&group, 0, &token, 1, &big)).await;
    c.ok(post(&group, 0, &token, 2, &big)).await;
    let e = c
        .error(post(&group, 0, &token, 3, b"one byte too many"))
        .await;
    assert_eq!(e.code(), ErrorCode::LimitExceeded);
    assert!(e.message.contains("queue is full"), "{}", e.message);
    c.request(subscribe(&a, false)).await;
    assert_eq!(
        fetched(&mut c, &a).await.len(),
        2,
        "the refused post is not stored"
    );
    c.ok(Request::Ack(Ack {
        queue_id: a.id.clone(),
        up_to_seq: 1,
        quiet: false,
    }))
    .await;
    c.ok(post(&group, 0, &token, 3, b"fits again")).await;
    let seqs: Vec<u64> = fetched(&mut c, &a).await.iter().map(|m| m.0).collect();
    assert_eq!(seqs, [2, 3]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_package_box_serves_at_most_its_claim_burst_whoever_asks() {
    let server = start_with(|c| {
        c.box_claim_burst = 3;
        c.box_claims_per_hour = 0;
    })
    .await;
    let mut owner = Client::connect(server.addr).await;
    owner.request(publish(5, 10)).await;
    owner.request(publish(6, 10)).await;
    // Each claim from a fresh connection: the per-connection limit does not help the attacker.
    for _ in 0..3 {
        let mut c = Client::connect(server.addr).await;
        assert!(matches!(c.request(claim(5)).await, Body::KeyPackage(_)));
    }
    let mut c = Client::connect(server.addr).await;
    let e = c.error(claim(5)).await;
    assert_eq!(e.code(), ErrorCode::LimitExceeded);
    assert!(e.message.contains("claimed too often"), "{}", e.message);
    // Another box is unaffected.
    assert!(matches!(c.request(claim(6)).await, Body::KeyPackage(_)));
    server.shutdown().await;
}

#[tokio::test]
async fn a_group_has_at_most_max_group_routes() {
    let server = start_with(|c| c.max_group_routes = 2).await;
    let mut c = Client::connect(server.addr).await;
    let (one, two, three) = (q(1), q(2), q(3));
    for x in [&one, &two, &three] {
        c.ok(create_queue(x)).await;
    }
    let token = vec![1u8; 32];
    let create = |group: u8, routes: Vec<Route>| {
        Request::CreateGroup(CreateGroup {
            group_id: vec![group; 32],
            epoch: 0,
            posting_token_hash: sha(&token),
            routes,
        })
    };
    let e = c
        .error(create(7, vec![route(&one), route(&two), route(&three)]))
        .await;
    assert_eq!(e.code(), ErrorCode::LimitExceeded);
    c.ok(create(8, vec![route(&one), route(&two)])).await;
    let commit = |add: Vec<Route>, remove: Vec<Vec<u8>>| {
        Request::Commit(Commit {
            group_id: vec![8; 32],
            epoch: 0,
            posting_token: token.clone(),
            commit: b"commit".to_vec(),
            next_posting_token_hash: sha(&[2; 32]),
            add_routes: add,
            remove_routes: remove,
            welcome: b"welcome".to_vec(),
        })
    };
    let e = c.error(commit(vec![route(&three)], vec![])).await;
    assert_eq!(e.code(), ErrorCode::LimitExceeded);
    // Swapping a member keeps the group within the limit.
    match c
        .request(commit(vec![route(&three)], vec![one.id.clone()]))
        .await
    {
        Body::Committed(done) => assert_eq!(done.epoch, 1),
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_subscribes_to_at_most_max_subscriptions_queues() {
    let server = start_with(|c| c.max_subscriptions = 2).await;
    let mut c = Client::connect(server.addr).await;
    for n in 1..=3 {
        c.ok(create_queue(&q(n))).await;
    }
    c.request(subscribe(&q(1), true)).await;
    c.request(subscribe(&q(2), false)).await;
    assert_eq!(
        c.error(subscribe(&q(3), false)).await.code(),
        ErrorCode::LimitExceeded
    );
    // Subscribing again to a queue it has is not a new subscription.
    assert!(matches!(
        c.request(subscribe(&q(1), false)).await,
        Body::Subscribed(_)
    ));
    let mut other = Client::connect(server.addr).await;
    assert!(matches!(
        other.request(subscribe(&q(3), false)).await,
        Body::Subscribed(_)
    ));
    server.shutdown().await;
}

/// Reads until the peer closes; `true` if it did within `PATIENCE`.
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let server = start_with(|c| c.handshake_timeout_secs = 1).await;
    // One sends half a request line; another sends nothing at all.
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert!(
        closed_by_server(&mut half).await,
        "half handshake kept open"
    );
    assert!(
        closed_by_server(&mut silent).await,
        "silent client kept open"
    );
    // Meanwhile, and after, others are served.
    let mut c = Client::connect(server.addr).await;
    c.ok(ping()).await;
    server.shutdown().await;
}

/// A WebSocket handshake done by hand, so the test can then write raw frame bytes.
async fn raw_upgrade(addr: std::net::SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    tcp
}

/// A masked binary WebSocket frame carrying `payload` (< 126 bytes).
fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut out = vec![0x82, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

#[tokio::test]
async fn a_frame_dripped_byte_by_byte_gets_the_connection_dropped_but_idle_is_fine() {
    let server = start_with(|c| c.frame_timeout_secs = 1).await;
    let frame = ws_frame(&encode(&ClientFrame {
        id: 1,
        request: Some(ping()),
    }));

    // Idle after the handshake is allowed (clients wait for pushes): a whole frame sent after
    // twice the frame timeout is answered.
    let mut idle = raw_upgrade(server.addr).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    idle.write_all(&frame).await.unwrap();
    let mut answer = [0u8; 2];
    idle.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], 0x82, "a binary frame answers");

    // A frame whose bytes trickle in slower than the timeout is cut off.
    let mut drip = raw_upgrade(server.addr).await;
    let dripper = tokio::spawn(async move {
        for b in &frame {
            if drip.write_all(&[*b]).await.is_err() {
                return (drip, false);
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        (drip, true)
    });
    let (mut drip, _) = dripper.await.unwrap();
    assert!(
        closed_by_server(&mut drip).await,
        "the dripping client was kept"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_after_the_send_timeout() {
    let server = start_with(|c| c.send_timeout_secs = 1).await;
    let mut writer = Client::connect(server.addr).await;
    let (a, group, token) = queue_and_group(&mut writer).await;
    let mut lazy = Client::connect(server.addr).await;
    lazy.request(subscribe(&a, true)).await;
    // Pushes pile up in the socket until writing blocks; the lazy reader never reads.
    let big = vec![7u8; 1024 * 1024];
    for n in 0..48u8 {
        writer.ok(post(&group, 0, &token, n, &big)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Now read: what was sent arrives, then the connection ends instead of more pushes.
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match lazy.ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the server kept a client that does not read");
    writer.ok(ping()).await;
    server.shutdown().await;
}

#[tokio::test]
async fn concurrent_claims_drain_one_time_packages_once_then_serve_the_last_resort() {
    let server = start_with(|c| {
        c.box_claim_burst = 1000;
    })
    .await;
    let mut owner = Client::connect(server.addr).await;
    owner.request(publish(9, 20)).await;
    let mut claims = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let addr = server.addr;
        claims.spawn(async move {
            let mut c = Client::connect(addr).await;
            let mut got = Vec::new();
            for _ in 0..3 {
                match c.request(claim(9)).await {
                    Body::KeyPackage(k) => got.push((k.key_package, k.last_resort)),
                    other => panic!("{other:?}"),
                }
            }
            got
        });
    }
    let mut one_time = std::collections::HashSet::new();
    let mut last_resort = 0;
    while let Some(got) = claims.join_next().await {
        for (data, is_last_resort) in got.unwrap() {
            if is_last_resort {
                assert_eq!(data, b"last resort");
                last_resort += 1;
            } else {
                assert!(
                    one_time.insert(data),
                    "a one-time package was handed out twice"
                );
            }
        }
    }
    assert_eq!(
        one_time.len(),
        20,
        "every one-time package handed out, once"
    );
    assert_eq!(last_resort, 16 * 3 - 20);
    let status = Request::KeyPackageStatus(blindpost_wire::KeyPackageStatus {
        box_id: vec![9; 16],
        box_secret: vec![9 ^ 0x77; 32],
    });
    match owner.request(status).await {
        Body::KeyPackageCount(n) => {
            assert_eq!(
                (n.one_time, n.has_last_resort),
                (0, true),
                "last resort kept"
            )
        }
        other => panic!("{other:?}"),
    }
    // The owner tops up: one-time packages come first again.
    owner.request(publish(9, 1)).await;
    match owner.request(claim(9)).await {
        Body::KeyPackage(k) => assert!(!k.last_resort),
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Flood, against the real binary so its memory can be read from /proc.

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_keeps_memory_bounded_and_other_clients_served() {
    const FLOODERS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_blindpostd"))
        .args(["--listen", "127.0.0.1:0", "--log", "off", "--data"])
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let addr: std::net::SocketAddr = line
        .strip_prefix("blindpostd listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let baseline = peak_rss_kib(pid);

    // Flooders pipeline near-maximum frames (a post to a group that does not exist) and pings
    // as fast as the server takes them, never reading an answer.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = tokio::task::JoinSet::new();
    for f in 0..FLOODERS {
        let stop = std::sync::Arc::clone(&stop);
        flood.spawn(async move {
            let mut c = Client::connect(addr).await;
            let heavy = encode(&ClientFrame {
                id: 1,
                request: Some(post(&[9; 32], 0, &[1; 32], f as u8, &vec![0x5A; 3 << 20])),
            });
            let light = encode(&ClientFrame {
                id: 2,
                request: Some(ping()),
            });
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let frame = if f % 2 == 0 { &heavy } else { &light };
                let write = c.ws.send(Message::binary(frame.clone()));
                match tokio::time::timeout(Duration::from_millis(200), write).await {
                    Ok(Ok(())) => sent += frame.len() as u64,
                    Ok(Err(_)) => break,
                    Err(_) => {} // back-pressure: the server is not reading us; fine.
                }
            }
            sent
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A legitimate client's round trips complete during the flood.
    let mut legit = Client::connect(addr).await;
    let (a, group, token) = queue_and_group(&mut legit).await;
    legit.request(subscribe(&a, false)).await;
    for n in 0..5u8 {
        legit.ok(post(&group, 0, &token, n, b"still served")).await;
    }
    assert_eq!(fetched(&mut legit, &a).await.len(), 5);
    // Keep flooding a while longer so the peak reflects a sustained flood.
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut flooded = 0u64;
    while let Some(sent) = flood.join_next().await {
        flooded += sent.unwrap();
    }
    let peak = peak_rss_kib(pid);
    // Bound: per connection at most one maximum WebSocket message being read and one being
    // decoded (2 x 4 MiB), plus a fixed 64 MiB for the runtime, SQLite caches and the rest.
    let bound = baseline + 64 * 1024 + (FLOODERS as u64 + 1) * 2 * 4 * 1024;
    eprintln!(
        "flood: {} MiB sent by {FLOODERS} connections; peak RSS {} MiB (baseline {} MiB, bound {} MiB)",
        flooded >> 20,
        peak >> 10,
        baseline >> 10,
        bound >> 10
    );
    assert!(
        peak <= bound,
        "peak RSS {peak} KiB above the bound {bound} KiB"
    );
    let _ = child.start_kill();
}
