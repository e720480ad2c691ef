//! Keepalive while waiting for pushes: a Ping every interval; a server that answers keeps the
//! connection; one that does not is declared dead one interval later. In paused time, over an
//! in-memory pipe, so the test takes no real seconds.

use std::collections::VecDeque;

use futures_util::StreamExt;
use tokio::time::Instant;

use crate::Error;
use crate::transport::{Connection, KEEPALIVE};

async fn pair() -> (
    Connection,
    tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>,
) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(tokio_tungstenite::accept_async(server_io));
    let (ws, _) = tokio_tungstenite::client_async(
        "ws://localhost/v1/ws",
        Box::new(client_io) as crate::transport::BoxIo,
    )
    .await
    .unwrap();
    let server = server.await.unwrap().unwrap();
    let conn = Connection {
        ws,
        next_id: 1,
        pushes: VecDeque::new(),
        next_ping: Instant::now() + KEEPALIVE,
        ping_unanswered: false,
    };
    (conn, server)
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_ping_is_a_dead_connection_and_an_answered_one_is_not() {
    // The server reads (so tungstenite answers each Ping) but sends nothing else.
    let (mut conn, mut server) = pair().await;
    let pings = tokio::spawn(async move {
        let mut n = 0;
        while let Some(Ok(msg)) = server.next().await {
            if msg.is_ping() {
                n += 1;
            }
        }
        n
    });
    let wait = tokio::time::timeout(KEEPALIVE * 5 + KEEPALIVE / 2, conn.next_push()).await;
    assert!(
        wait.is_err(),
        "an answering server stays connected: {wait:?}"
    );
    drop(conn);
    assert!(pings.await.unwrap() >= 4, "a ping every interval");

    // The server holds the connection but never reads, so no Pong ever comes.
    let (mut conn, _silent) = pair().await;
    let started = Instant::now();
    let err = conn.next_push().await.err().unwrap();
    assert!(
        matches!(err, Error::Unreachable(ref m) if m.contains("keepalive")),
        "{err}"
    );
    let took = started.elapsed();
    assert!(took >= KEEPALIVE * 2 && took < KEEPALIVE * 3, "{took:?}");
}

/// Requests leave padded to their size bucket (as the server's answers do), so a ping, an
/// acknowledgement and a small post look alike on the wire.
#[tokio::test]
async fn requests_leave_padded_to_a_size_bucket() {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let (mut conn, mut server) = pair().await;
    let answer = tokio::spawn(async move {
        let Some(Ok(Message::Binary(bytes))) = server.next().await else {
            panic!("no request frame");
        };
        let frame = blindpost_wire::decode_client(&bytes).unwrap();
        let reply = blindpost_wire::ServerFrame::from(blindpost_wire::Response::ok(frame.id));
        server
            .send(Message::binary(blindpost_wire::encode_padded(&reply)))
            .await
            .unwrap();
        bytes.len()
    });
    conn.call(blindpost_wire::Request::Ping(blindpost_wire::Ping {}))
        .await
        .unwrap();
    assert_eq!(answer.await.unwrap(), 256);
}
