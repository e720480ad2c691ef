//! A hostile network, with real parts: the real `blindpostd` over `wss://` with a self-signed
//! pin, the real `blindpostd relay`, a real SOCKS5 server (`microsocks`), packet captures
//! (`tcpdump`), and a censor built from network namespaces and nftables. Tests that need a
//! tool this machine lacks say `SKIPPED …` and pass, unless `BLINDPOST_REQUIRE_NETWORK_TOOLS`
//! is set (CI sets it and installs the tools).

mod util;

use std::time::{Duration, Instant};

use util::net::{self, Capture, Netns, Relay, TlsServer};
use util::{User, texts};

/// A profile set up on a TLS server by its pin.
fn setup_pinned(name: &str, url: &str, pin: &str, extra: &[&str]) -> User {
    let user = User::fresh(name);
    let mut args = vec![
        "setup",
        "--server",
        url,
        "--server-pin",
        pin,
        "--username",
        name,
    ];
    args.extend_from_slice(extra);
    user.ok(&args);
    user
}

#[test]
fn chat_works_over_wss_with_a_self_signed_pin_and_a_wrong_pin_is_refused() {
    let server = TlsServer::start("127.0.0.1:0", &[]);
    assert!(server.pin.starts_with("sha256:") && server.pin.len() == 7 + 64);
    let url = format!("wss://{}", server.addr);
    let alice = setup_pinned("alice", &url, &server.pin, &[]);
    let bob = setup_pinned("bob", &url, &server.pin, &[]);
    alice.ok(&["send", "@bob", "hello over tls"]);
    assert_eq!(bob.receive_texts(), vec!["hello over tls"]);
    bob.ok(&["send", "@alice", "and back"]);
    assert_eq!(alice.receive_texts(), vec!["and back"]);

    // Another certificate's pin: refused, in one line, and nothing is set up.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let mallory = User::fresh("mallory");
    let err = mallory.fails(&[
        "setup",
        "--server",
        &url,
        "--server-pin",
        &wrong,
        "--username",
        "mallory",
    ]);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&wrong) && err.contains("pin"), "{err}");
    // No pin and no public root vouching for it: refused as well, never a silent fallback.
    let err = User::fresh("eve").fails(&["setup", "--server", &url, "--username", "eve"]);
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn the_link_blindpostd_prints_sets_up_a_client_that_chats_and_shares_it_back() {
    let ws_path = "/linked-path";
    let server = TlsServer::start("127.0.0.1:0", &["--ws-path", ws_path]);
    let relay = Relay::start("127.0.0.1:0", &server.addr, "/linked-relay");
    let relay_url = format!("wss://{}/linked-relay", relay.addr);
    let out = std::process::Command::new(util::bin("blindpostd"))
        .args(["link", "--url", &format!("wss://{}", server.addr)])
        .args(["--relay", &relay_url, "--relay-pin", &relay.pin])
        .args(["--tls", "self-signed", "--ws-path", ws_path, "--data"])
        .arg(&server.data)
        .output()
        .expect("blindpostd link runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let link = stdout.lines().next().expect("the link line").to_string();
    assert!(link.starts_with("blindpost://connect?"), "{link}");
    assert!(link.contains(&server.pin) && link.contains(ws_path) && link.contains(&relay.pin));
    assert!(stdout.lines().count() > 10, "no QR code after the link");

    let alice = User::fresh("alicelinked");
    alice.ok(&["setup", "--server-link", &link, "--username", "alicelinked"]);
    let bob = User::fresh("boblinked");
    bob.ok(&["setup", "--server-link", &link, "--username", "boblinked"]);
    alice.ok(&["send", "@boblinked", "set up from a link"]);
    assert_eq!(bob.receive_texts(), ["set up from a link"]);
    let shared = alice.ok(&["servers", "share"]);
    assert_eq!(shared.lines().next(), Some(link.as_str()));
}

#[test]
fn plaintext_to_a_non_loopback_host_is_refused_before_connecting() {
    let user = User::fresh("carol");
    let started = Instant::now();
    // 192.0.2.0/24 is TEST-NET-1: nothing answers there, so a connection attempt would hang
    // until its timeout; the refusal must come first.
    let err = user.fails(&[
        "setup",
        "--server",
        "ws://192.0.2.1:7480",
        "--username",
        "carol",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "it tried to connect"
    );
    assert!(err.contains("--insecure-plaintext"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn chat_goes_through_a_socks5_proxy_and_stops_when_the_proxy_stops() {
    let test = "chat_goes_through_a_socks5_proxy_and_stops_when_the_proxy_stops";
    if !net::have_tool(test, "microsocks") {
        return;
    }
    let server = TlsServer::start("127.0.0.1:0", &[]);
    let port = net::free_port("127.0.0.1");
    let mut proxy = net::microsocks("127.0.0.1", port);
    let proxy_url = format!("socks5h://127.0.0.1:{port}");
    // `localhost`, not an address: the proxy resolves it (socks5h).
    let server_port = server.addr.rsplit(':').next().expect("a port");
    let url = format!("wss://localhost:{server_port}");
    let alice = setup_pinned("alice", &url, &server.pin, &["--proxy", &proxy_url]);
    let bob = setup_pinned("bob", &url, &server.pin, &["--proxy", &proxy_url]);
    alice.ok(&["send", "@bob", "via socks"]);
    let out = bob.run(&["-v", "receive", "--json"]);
    assert!(out.status.success());
    assert_eq!(
        texts(&util::parse_lines(&String::from_utf8_lossy(&out.stdout))),
        ["via socks"]
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&proxy_url),
        "-v does not say the proxy was used: {said}"
    );

    proxy.kill();
    let err = alice.fails(&["send", "@bob", "no proxy, no message"]);
    assert!(
        err.to_lowercase().contains("unreachable") || err.contains("proxy"),
        "{err}"
    );
}

#[test]
fn chat_through_a_relay_shows_nothing_but_tls_on_the_wire() {
    let test = "chat_through_a_relay_shows_nothing_but_tls_on_the_wire";
    if !net::have_tool(test, "tcpdump") {
        return;
    }
    let ws_path = "/hidden-ws-path-4f1c";
    let relay_path = "/relay-path-9d2e";
    let server = TlsServer::start("127.0.0.1:0", &["--ws-path", ws_path]);
    let relay = Relay::start("127.0.0.1:0", &server.addr, relay_path);
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .expect("port")
            .parse::<u16>()
            .expect("port")
    };
    let capture = Capture::start(&[port(&server.addr), port(&relay.addr)]);

    // Nothing answers at the server's own address from here (it listens on 127.0.0.1 only):
    // only the relay reaches it. Its name travels only inside the tunnel, as the inner SNI.
    let server_port = port(&server.addr);
    let url = format!("wss://127.0.0.2:{server_port}{ws_path}");
    let relay_url = format!("wss://{}{relay_path}", relay.addr);
    let via_relay = [
        "--relay",
        relay_url.as_str(),
        "--relay-pin",
        relay.pin.as_str(),
        "--sni",
        "chat.blindpost.test",
    ];
    let alice = setup_pinned("alicerelayed", &url, &server.pin, &via_relay);
    let bob = setup_pinned("bobrelayed", &url, &server.pin, &via_relay);
    let secret = "a sentence nobody on the path may read";
    alice.ok(&["send", "@bobrelayed", secret]);
    let out = bob.run(&["-v", "receive", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        texts(&util::parse_lines(&String::from_utf8_lossy(&out.stdout))),
        [secret]
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("relay"),
        "-v does not say a relay was used: {said}"
    );

    let (raw, flows) = capture.finish();
    let total: usize = flows.iter().map(|f| f.bytes.len()).sum();
    assert!(total > 10_000, "the capture holds only {total} bytes");
    for needle in [
        "alicerelayed",
        "bobrelayed",
        secret,
        ws_path,
        relay_path,
        "Upgrade",
        "websocket",
    ] {
        assert!(
            !net::contains(&raw, needle.as_bytes()),
            "{needle:?} is in the capture"
        );
    }
    // Every byte each side sent, client to relay and relay to server, is a TLS record: no
    // protobuf frame, HTTP request or WebSocket frame travels in the clear.
    for flow in &flows {
        if let Err(e) = net::all_tls_records(&flow.bytes) {
            panic!("{:?} → {:?}: {e}", flow.from, flow.to);
        }
    }
    assert!(flows.len() >= 4, "expected both hops in both directions");
    // Between the client and the relay, not even the server's name shows (the inner
    // ClientHello is inside the outer TLS); past the relay it does, as any TLS SNI would.
    let relay_port = port(&relay.addr);
    for flow in flows
        .iter()
        .filter(|f| f.from.1 == relay_port || f.to.1 == relay_port)
    {
        assert!(!net::contains(&flow.bytes, b"chat.blindpost.test"));
    }
}

/// The censor: a client namespace whose firewall drops every packet to the server's address
/// and resets any connection to port 443 whose bytes name the server (its TLS SNI), as
/// national firewalls do. Outside it: the server, a relay and a SOCKS5 proxy.
#[test]
fn behind_a_censor_the_client_gets_through_by_relay_and_by_socks5() {
    let test = "behind_a_censor_the_client_gets_through_by_relay_and_by_socks5";
    if !Netns::available(test) || !net::have_tool(test, "microsocks") {
        return;
    }
    const SERVER_IP: &str = "198.18.0.1";
    const RELAY_IP: &str = "198.18.0.2";
    const PROXY_IP: &str = "198.18.0.3";
    const NAME: &str = "chat.blindpost.test";
    let hosts =
        format!("127.0.0.1 localhost\n{SERVER_IP} {NAME}\n{RELAY_IP} relay.blindpost.test\n");
    let ns = Netns::create(
        "bp-censor",
        "198.18.0.10/24",
        &["198.18.0.1/24", "198.18.0.2/24", "198.18.0.3/24"],
        &hosts,
    );
    ns.exec_ok(&["nft", "add", "table", "inet", "censor"]);
    ns.exec_ok(&[
        "nft",
        "add chain inet censor out { type filter hook output priority 0 ; }",
    ]);
    ns.exec_ok(&[
        "nft",
        &format!("add rule inet censor out ip daddr {SERVER_IP} counter drop"),
    ]);
    ns.exec_ok(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--dport",
        "443",
        "-m",
        "string",
        "--string",
        NAME,
        "--algo",
        "bm",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ]);

    let ws_path = "/censored-ws";
    let server = TlsServer::start(&format!("{SERVER_IP}:443"), &["--ws-path", ws_path]);
    let relay = Relay::start(&format!("{RELAY_IP}:443"), &server.addr, "/r-7c1");
    let _proxy = net::microsocks(PROXY_IP, 1080);
    let url = format!("wss://{NAME}{ws_path}");

    // Outside the censor: direct, the name given as the address to connect to.
    let alice = User::fresh("alice");
    alice.ok(&[
        "setup",
        "--server",
        &url,
        "--server-pin",
        &server.pin,
        "--connect-to",
        &server.addr,
        "--username",
        "alice",
    ]);
    // Inside: one with a relay configured, one with a SOCKS5 proxy; no other action.
    let bob = User::fresh_in(&ns.name, "bob");
    bob.ok(&[
        "setup",
        "--server",
        &url,
        "--server-pin",
        &server.pin,
        "--relay",
        "wss://relay.blindpost.test/r-7c1",
        "--relay-pin",
        &relay.pin,
        "--username",
        "bob",
    ]);
    // The proxy outside resolves names with its own resolver, which knows no test names:
    // carol names the server by the address the censor blocks.
    let carol = User::fresh_in(&ns.name, "carol");
    let by_address = format!("wss://{SERVER_IP}{ws_path}");
    let proxy = format!("socks5h://{PROXY_IP}:1080");
    carol.ok(&[
        "setup",
        "--server",
        &by_address,
        "--server-pin",
        &server.pin,
        "--proxy",
        &proxy,
        "--username",
        "carol",
    ]);

    alice.ok(&["send", "@bob", "past the firewall"]);
    alice.ok(&["send", "@carol", "past it too"]);
    let out = bob.run(&["-v", "receive", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        texts(&util::parse_lines(&String::from_utf8_lossy(&out.stdout))),
        ["past the firewall"]
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("relay"));
    assert_eq!(carol.receive_texts(), ["past it too"]);
    bob.ok(&["send", "@alice", "reply from behind it"]);
    assert_eq!(alice.receive_texts(), ["reply from behind it"]);

    // The censor really acted: packets to the server's address were dropped (the client's
    // direct attempt), and a direct connection naming the server is cut.
    let ruleset = ns.exec_output(&["nft", "list", "table", "inet", "censor"]);
    let dropped = ruleset
        .split("packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "nothing was dropped: {ruleset}");
    let dave = User::fresh_in(&ns.name, "dave");
    dave.fails(&[
        "setup",
        "--server",
        &url,
        "--server-pin",
        &server.pin,
        "--connect-to",
        &format!("{RELAY_IP}:443"),
        "--username",
        "dave",
    ]);
    let counters = ns.exec_output(&["iptables", "-nvxL", "OUTPUT"]);
    let reset = counters
        .lines()
        .find(|l| l.contains("STRING match"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(reset > 0, "the SNI rule never fired: {counters}");
}
