//! End-to-end tests of the WebSocket front: `blindpost_server::run` on port 0 with a fresh
//! data directory, driven with `tokio-tungstenite` and the wire types; plus the real
//! `blindpostd` binary's stdout line and clean shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_malformed_frame_gets_an_error_and_the_connection_keeps_serving() {
    let server = start().await;
    let mut c = Client::connect(server.addr).await;
    c.send(Message::binary(vec![0xff, 0xff, 0xff])).await;
    let r = c.response().await;
    assert_eq!(r.id, 0);
    assert_eq!(error_response(&r).code(), ErrorCode::Malformed);

    // A frame without a request is malformed too, answered under its id.
    c.send(Message::binary(encode(&ClientFrame {
        id: 42,
        request: None,
    })))
    .await;
    let r = c.response().await;
    assert_eq!(r.id, 42);
    assert_eq!(error_response(&r).code(), ErrorCode::Malformed);

    c.ok(Request::Ping(Ping {})).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_oversized_frame_is_too_large_while_other_connections_are_served() {
    let server = start().await;
    let mut big = Client::connect(server.addr).await;
    let mut other = Client::connect(server.addr).await;
    big.send(Message::binary(vec![0u8; MAX_FRAME_BYTES + 1]))
        .await;
    other.ok(Request::Ping(Ping {})).await;
    let r = big.response().await;
    assert_eq!(r.id, 0);
    assert_eq!(error_response(&r).code(), ErrorCode::TooLarge);
    big.ok(Request::Ping(Ping {})).await;
    other.ok(Request::Ping(Ping {})).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_text_frame_gets_a_malformed_error() {
    let server = start().await;
    let mut c = Client::connect(server.addr).await;
    c.send(Message::text("hello")).await;
    let r = c.response().await;
    assert_eq!(r.id, 0);
    assert_eq!(error_response(&r).code(), ErrorCode::Malformed);
    c.ok(Request::Ping(Ping {})).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_idle_connection_is_pinged_and_frames_leave_padded_to_size_buckets() {
    use futures_util::StreamExt as _;
    let server = start_with(|c| c.keepalive_secs = 1).await;
    let mut c = Client::connect(server.addr).await;
    c.ok(Request::Ping(Ping {})).await;
    let ping = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Ping(_))) => return,
                Some(Ok(_)) => {}
                other => panic!("the connection ended: {other:?}"),
            }
        }
    })
    .await;
    assert!(ping.is_ok(), "no ping within 5 s with keepalive_secs = 1");
    // An answer as small as a ping's still fills the smallest bucket.
    c.send(Message::binary(blindpost_wire::encode(
        &blindpost_wire::ClientFrame {
            id: 9,
            request: Some(Request::Ping(Ping {})),
        },
    )))
    .await;
    let answer = loop {
        match c.ws.next().await {
            Some(Ok(Message::Binary(bytes))) => break bytes,
            Some(Ok(_)) => {}
            other => panic!("the connection ended: {other:?}"),
        }
    };
    assert_eq!(answer.len(), 256);
    server.shutdown().await;
}

#[tokio::test]
async fn full_flow_commit_welcome_post_push_fetch_ack() {
    let server = start().await;
    let mut alice = Client::connect(server.addr).await;
    let mut bob = Client::connect(server.addr).await;
    let (a, group, token) = queue_and_group(&mut alice).await;
    let b = q(2);
    bob.ok(create_queue(&b)).await;
    match bob.request(subscribe(&b, true)).await {
        Body::Subscribed(s) => assert_eq!(s.head_seq, 0),
        other => panic!("{other:?}"),
    }

    // Alice adds Bob: the commit goes to her queue, the welcome to his.
    let next_token = vec![2u8; 32];
    match alice
        .request(Request::Commit(Commit {
            group_id: group.clone(),
            epoch: 0,
            posting_token: token.clone(),
            commit: b"commit-1".to_vec(),
            next_posting_token_hash: sha(&next_token),
            add_routes: vec![route(&b)],
            remove_routes: vec![],
            welcome: b"welcome".to_vec(),
        }))
        .await
    {
        Body::Committed(c) => assert_eq!(c.epoch, 1),
        other => panic!("{other:?}"),
    }
    alice.ok(post(&group, 1, &next_token, 1, b"hello")).await;
    alice.ok(post(&group, 1, &next_token, 2, b"world")).await;

    let pushed = bob.pushed(&b.id, 3).await;
    let got: Vec<(u64, &[u8])> = pushed
        .iter()
        .map(|m| (m.seq, m.payload.as_slice()))
        .collect();
    assert_eq!(got, [(1, &b"welcome"[..]), (2, b"hello"), (3, b"world")]);

    // Fetch returns the same; after the ack they are gone.
    assert_eq!(
        fetched(&mut bob, &b).await,
        [
            (1, b"welcome".to_vec()),
            (2, b"hello".to_vec()),
            (3, b"world".to_vec())
        ]
    );
    bob.ok(Request::Ack(Ack {
        queue_id: b.id.clone(),
        up_to_seq: 3,
        quiet: false,
    }))
    .await;
    assert!(fetched(&mut bob, &b).await.is_empty());

    // A later post is pushed with the next sequence number only.
    alice.ok(post(&group, 1, &next_token, 3, b"again")).await;
    let pushed = bob.pushed(&b.id, 1).await;
    assert_eq!(
        (pushed[0].seq, pushed[0].payload.as_slice()),
        (4, &b"again"[..])
    );

    // Alice's own queue got the commit and the posts.
    alice.request(subscribe(&a, false)).await;
    let mine: Vec<Vec<u8>> = fetched(&mut alice, &a)
        .await
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        mine,
        [
            b"commit-1".to_vec(),
            b"hello".to_vec(),
            b"world".to_vec(),
            b"again".to_vec()
        ]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscription_pushes_the_backlog_after_after_seq() {
    let server = start().await;
    let mut c = Client::connect(server.addr).await;
    let (a, group, token) = queue_and_group(&mut c).await;
    for i in 1..=3u8 {
        c.ok(post(&group, 0, &token, i, &[i])).await;
    }
    let mut sub = Client::connect(server.addr).await;
    let r = sub
        .request(Request::Subscribe(Subscribe {
            queue_id: a.id.clone(),
            receive_secret: a.receive.clone(),
            push: true,
            after_seq: 1,
        }))
        .await;
    assert!(matches!(r, Body::Subscribed(s) if s.head_seq == 3));
    let pushed = sub.pushed(&a.id, 2).await;
    assert_eq!(pushed.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3]);
    server.shutdown().await;
}

#[tokio::test]
async fn posts_check_token_and_epoch_and_are_stored_once() {
    let server = start().await;
    let mut c = Client::connect(server.addr).await;
    let (a, group, token) = queue_and_group(&mut c).await;

    let e = c.error(post(&group, 0, &[9u8; 32], 1, b"x")).await;
    assert_eq!(e.code(), ErrorCode::Forbidden);
    let e = c.error(post(&group, 5, &token, 1, b"x")).await;
    assert_eq!(e.code(), ErrorCode::StaleEpoch);
    assert_eq!(e.current_epoch, 0);
    let e = c.error(post(&[8u8; 32], 0, &token, 1, b"x")).await;
    assert_eq!(e.code(), ErrorCode::NotFound);
    let e = c.error(post(&group[..5], 0, &token, 1, b"x")).await;
    assert_eq!(e.code(), ErrorCode::InvalidArgument);

    c.ok(post(&group, 0, &token, 1, b"once")).await;
    c.ok(post(&group, 0, &token, 1, b"once")).await;
    c.request(subscribe(&a, false)).await;
    assert_eq!(fetched(&mut c, &a).await, [(1, b"once".to_vec())]);

    // After a commit, the old epoch is stale and carries the new one.
    c.request(Request::Commit(Commit {
        group_id: group.clone(),
        epoch: 0,
        posting_token: token.clone(),
        commit: b"c".to_vec(),
        next_posting_token_hash: sha(&[3u8; 32]),
        ..Commit::default()
    }))
    .await;
    let e = c.error(post(&group, 0, &token, 2, b"late")).await;
    assert_eq!((e.code(), e.current_epoch), (ErrorCode::StaleEpoch, 1));
    server.shutdown().await;
}

#[tokio::test]
async fn queues_need_a_subscription_on_this_connection() {
    let server = start().await;
    let mut c = Client::connect(server.addr).await;
    let a = q(1);
    c.ok(create_queue(&a)).await;
    assert_eq!(c.error(fetch(&a)).await.code(), ErrorCode::Forbidden);
    let wrong = Request::Subscribe(Subscribe {
        queue_id: a.id.clone(),
        receive_secret: vec![0; 32],
        push: false,
        after_seq: 0,
    });
    assert_eq!(c.error(wrong).await.code(), ErrorCode::Forbidden);
    assert_eq!(
        c.error(subscribe(&q(9), false)).await.code(),
        ErrorCode::NotFound
    );
    assert_eq!(c.error(create_queue(&a)).await.code(), ErrorCode::Conflict);
    c.request(subscribe(&a, false)).await;
    assert!(fetched(&mut c, &a).await.is_empty());
    // Another connection has not authenticated it.
    let mut other = Client::connect(server.addr).await;
    assert_eq!(other.error(fetch(&a)).await.code(), ErrorCode::Forbidden);
    server.shutdown().await;
}

#[tokio::test]
async fn key_package_claims_are_rate_limited_per_connection() {
    let server = start_with(|c| {
        c.claim_burst = 2;
        c.claims_per_minute = 0;
    })
    .await;
    let mut c = Client::connect(server.addr).await;
    let publish = Request::PublishKeyPackages(PublishKeyPackages {
        box_id: vec![5; 16],
        box_secret: vec![6; 32],
        key_packages: vec![b"kp1".to_vec(), b"kp2".to_vec()],
        last_resort: b"last".to_vec(),
    });
    match c.request(publish).await {
        Body::KeyPackageCount(n) => assert_eq!((n.one_time, n.has_last_resort), (2, true)),
        other => panic!("{other:?}"),
    }
    let claim = || {
        Request::ClaimKeyPackage(ClaimKeyPackage {
            box_id: vec![5; 16],
        })
    };
    for expected in [&b"kp1"[..], b"kp2"] {
        match c.request(claim()).await {
            Body::KeyPackage(k) => {
                assert_eq!((k.key_package.as_slice(), k.last_resort), (expected, false))
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(c.error(claim()).await.code(), ErrorCode::LimitExceeded);
    // The limit is per connection.
    let mut other = Client::connect(server.addr).await;
    match other.request(claim()).await {
        Body::KeyPackage(k) => assert!(k.last_resort),
        x => panic!("{x:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn the_directory_registers_verified_entries_and_looks_them_up() {
    let server = start().await;
    let mut c = Client::connect(server.addr).await;
    let key = SigningKey::from_bytes(&[3; 32]);
    let sign = |version: u64| {
        let entry = DirectoryEntry {
            username: "alice".into(),
            identity_key: key.verifying_key().to_bytes().to_vec(),
            devices: vec![Device {
                signature_key: vec![1; 32],
                box_id: vec![2; 16],
            }],
            version,
        }
        .encode_to_vec();
        let mut msg = DIRECTORY_SIGNATURE_CONTEXT.to_vec();
        msg.extend_from_slice(&entry);
        SignedDirectoryEntry {
            signature: key.sign(&msg).to_bytes().to_vec(),
            entry,
        }
    };
    let register = |e: SignedDirectoryEntry| Request::RegisterUser(RegisterUser { entry: Some(e) });
    c.ok(register(sign(1))).await;
    assert_eq!(c.error(register(sign(1))).await.code(), ErrorCode::Conflict);
    let mut forged = sign(2);
    forged.signature[0] ^= 1;
    assert_eq!(c.error(register(forged)).await.code(), ErrorCode::Forbidden);
    c.ok(register(sign(2))).await;
    let lookup = |name: &str| {
        Request::LookupUser(LookupUser {
            username: name.into(),
        })
    };
    match c.request(lookup("alice")).await {
        Body::User(u) => assert_eq!(u, sign(2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.error(lookup("nobody")).await.code(), ErrorCode::NotFound);
    assert_eq!(
        c.error(lookup("NoBody")).await.code(),
        ErrorCode::InvalidArgument
    );
    server.shutdown().await;
}

#[tokio::test]
async fn healthz_answers_ok() {
    let server = start().await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_binary_prints_its_address_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_blindpostd"))
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let addr: SocketAddr = line
        .strip_prefix("blindpostd listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
    let mut c = Client::connect(addr).await;
    c.ok(Request::Ping(Ping {})).await;

    let pid = child.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        lines.next_line().await.unwrap(),
        None,
        "stdout holds exactly one line"
    );
    assert!(dir.path().join("data").join("blindpost.sqlite3").exists());
}

#[tokio::test]
async fn acknowledgements_answered_before_their_commit_are_stored_by_shutdown() {
    // Acks are answered once their delete is under way; shutdown waits for those deletes.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start_with(|c| c.data_dir = data.clone()).await;
    let mut c = Client::connect(server.addr).await;
    let (a, group, token) = queue_and_group(&mut c).await;
    for i in 1..=5u8 {
        c.ok(post(&group, 0, &token, i, &[i])).await;
    }
    c.request(subscribe(&a, false)).await;
    c.ok(Request::Ack(Ack {
        queue_id: a.id.clone(),
        up_to_seq: 4,
        quiet: false,
    }))
    .await;
    assert_eq!(
        fetched(&mut c, &a).await,
        [(5, vec![5u8])],
        "this connection never sees what it acknowledged"
    );
    server.shutdown().await;

    let store =
        blindpost_server::store::SqliteStore::open(&data, std::sync::Arc::new(|| 1)).unwrap();
    let left = blindpost_server::store::Store::fetch(
        &store,
        blindpost_server::types::QueueId::parse(&a.id).unwrap(),
        0,
        blindpost_server::store::FetchLimit {
            max_messages: 100,
            max_bytes: 1 << 20,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        left.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [5],
        "the acknowledged messages were deleted before the server stopped"
    );
}

#[tokio::test]
async fn a_quiet_ack_is_answered_only_when_it_fails() {
    let server = start().await;
    let mut c = Client::connect(server.addr).await;
    let (a, group, token) = queue_and_group(&mut c).await;
    for i in 1..=3u8 {
        c.ok(post(&group, 0, &token, i, &[i])).await;
    }
    let quiet = |up_to_seq| {
        Request::Ack(Ack {
            queue_id: a.id.clone(),
            up_to_seq,
            quiet: true,
        })
    };
    // Not subscribed on this connection: refused, and the refusal is answered.
    assert_eq!(c.error(quiet(2)).await.code(), ErrorCode::Forbidden);
    c.request(subscribe(&a, false)).await;
    let frame = ClientFrame {
        id: 9_999,
        request: Some(quiet(2)),
    };
    c.send(Message::binary(encode(&frame))).await;
    // The next answer is the ping's (`request` checks the id): the ack got none.
    c.ok(Request::Ping(Ping {})).await;
    assert_eq!(
        fetched(&mut c, &a).await,
        [(3, vec![3u8])],
        "the quiet ack deleted what it acknowledged"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_post_skipping_subscribed_queues_reaches_every_other_route_only() {
    let server = start().await;
    let mut alice = Client::connect(server.addr).await;
    let mut bob = Client::connect(server.addr).await;
    let (a, b) = (q(1), q(2));
    alice.ok(create_queue(&a)).await;
    bob.ok(create_queue(&b)).await;
    let group = vec![7u8; 32];
    let token = vec![1u8; 32];
    alice
        .ok(Request::CreateGroup(CreateGroup {
            group_id: group.clone(),
            epoch: 0,
            posting_token_hash: sha(&token),
            routes: vec![route(&a), route(&b)],
        }))
        .await;
    let skipping = |id: u8| {
        let Request::Post(mut p) = post(&group, 0, &token, id, &[id]) else {
            unreachable!("post builds a Post")
        };
        p.skip_subscribed = true;
        Request::Post(p)
    };
    // Not subscribed to anything yet: nothing is skipped.
    alice.ok(skipping(1)).await;
    alice.request(subscribe(&a, false)).await;
    alice.ok(skipping(2)).await;
    alice.ok(post(&group, 0, &token, 3, &[3])).await;
    assert_eq!(
        fetched(&mut alice, &a).await,
        [(1, vec![1u8]), (2, vec![3u8])],
        "no echo of the post that skipped the poster's subscribed queue"
    );
    bob.request(subscribe(&b, false)).await;
    assert_eq!(
        fetched(&mut bob, &b).await,
        [(1, vec![1u8]), (2, vec![2u8]), (3, vec![3u8])],
        "every other route gets every post"
    );
    // A queue authenticated after the first skipping post is skipped too: the set a post
    // skips follows the connection's subscriptions.
    alice.request(subscribe(&b, false)).await;
    alice.ok(skipping(4)).await;
    assert_eq!(
        fetched(&mut alice, &b).await,
        [(1, vec![1u8]), (2, vec![2u8]), (3, vec![3u8])],
        "the post skipped the queue subscribed later"
    );
    assert_eq!(fetched(&mut alice, &a).await.len(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn pushes_arrive_in_order_and_complete_when_posts_outrun_the_subscriber() {
    // Most pushes are handed over from memory; more than an inbox holds falls back to the
    // store. Either way the subscriber sees every sequence number once, in order.
    let server = start().await;
    let mut poster = Client::connect(server.addr).await;
    let (a, group, token) = queue_and_group(&mut poster).await;
    let mut sub = Client::connect(server.addr).await;
    sub.request(subscribe(&a, true)).await;
    let n = blindpost_server::hub::HELD_MESSAGES as u8 + 40;
    for i in 1..=n {
        poster.ok(post(&group, 0, &token, i, &[i; 100])).await;
    }
    let pushed = sub.pushed(&a.id, usize::from(n)).await;
    assert_eq!(
        pushed.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=u64::from(n)).collect::<Vec<_>>()
    );
    assert!(
        pushed
            .iter()
            .all(|m| m.payload == vec![u8::try_from(m.seq).unwrap(); 100]),
        "each payload is the one posted at that sequence number"
    );
    server.shutdown().await;
}
