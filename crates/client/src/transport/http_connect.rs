//! The HTTP `CONNECT` handshake with a proxy (RFC 9110 §9.3.6): ask for a tunnel to
//! `host:port` by name (the proxy resolves it), with `Proxy-Authorization: Basic` when
//! credentials are given, and read the answer's head. Hand-written because it is one request
//! and one status line; the HTTP client crates would bring a connection pool and a second
//! TLS stack for it. The answer is untrusted: its head is capped and read byte by byte so no
//! tunnel bytes are swallowed. Not for: choosing or dialling the proxy (`dial`).

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest answer head accepted from the proxy.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Asks the proxy on `stream` for a tunnel to `target` (`host:port`, `[v6]:port`) and returns
/// the stream, now a tunnel, once the proxy answered 2xx.
pub(crate) async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    target: &str,
    auth: Option<(&str, &str)>,
) -> Result<S, String> {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, pass)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;

    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD_BYTES {
            return Err(format!("its answer is longer than {MAX_HEAD_BYTES} bytes"));
        }
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("it closed the connection before answering CONNECT".into());
        }
        head.push(byte[0]);
    }
    let status_line = head
        .split(|&b| b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
        .unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err("it did not answer CONNECT with HTTP".into());
    }
    if !code.starts_with('2') {
        // The reason phrase is the proxy's text: shown, but bounded.
        let shown: String = status_line.chars().take(120).collect();
        return Err(format!("it refused the tunnel: {shown}"));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tunnel_is_asked_for_by_name_and_a_refusal_is_an_error() {
        let (client, mut proxy) = tokio::io::duplex(4096);
        let answer = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let n = proxy.read(&mut buf).await.unwrap();
            proxy
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\nTUNNEL")
                .await
                .unwrap();
            String::from_utf8(buf[..n].to_vec()).unwrap()
        });
        let mut s = connect(client, "example.org:443", Some(("u", "p")))
            .await
            .unwrap();
        let request = answer.await.unwrap();
        assert!(
            request.starts_with("CONNECT example.org:443 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("Proxy-Authorization: Basic dTpw\r\n"),
            "{request}"
        );
        let mut rest = [0u8; 6];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(
            &rest, b"TUNNEL",
            "bytes after the head belong to the tunnel"
        );

        let (client, mut proxy) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let _ = proxy.read(&mut buf).await;
            let _ = proxy
                .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                .await;
        });
        let err = connect(client, "h:1", None).await.err().unwrap();
        assert!(err.contains("407"), "{err}");
    }
}
