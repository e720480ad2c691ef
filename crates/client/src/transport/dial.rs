//! The bottom layer of every connection: a TCP stream to a host and port, opened directly or
//! through the configured proxy, returned boxed so the layers above (TLS, relay tunnel,
//! WebSocket) do not care which. With `socks5h://` or `http://` the destination's name goes
//! to the proxy unresolved, so no DNS lookup of it happens here. Not for: TLS (`tls`).

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_socks::tcp::Socks5Stream;

use super::endpoint::{Host, Proxy, ProxyKind};
use super::http_connect;
use crate::error::{Error, Result};

/// Any byte stream a connection layer can sit on (TCP, a proxy tunnel, TLS, a relay tunnel).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed byte stream: what every layer takes and returns.
pub type BoxIo = Box<dyn Io>;

/// Opens a byte stream to `host:port`, through `proxy` when one is set.
pub(crate) async fn dial(proxy: Option<&Proxy>, host: &Host, port: u16) -> Result<BoxIo> {
    let Some(proxy) = proxy else {
        return Ok(Box::new(tcp(host, port).await?));
    };
    let to_proxy = tcp(&proxy.host, proxy.port)
        .await
        .map_err(|e| Error::Unreachable(format!("proxy {}: {e}", proxy.shown)))?;
    let shown = &proxy.shown;
    let refused = |e: tokio_socks::Error| {
        Error::Unreachable(format!("proxy {shown} could not reach {host}:{port}: {e}"))
    };
    match proxy.kind {
        ProxyKind::Socks5h => {
            let target = match host {
                Host::Name(n) => tokio_socks::TargetAddr::Domain(n.as_str().into(), port),
                Host::Ip(ip) => tokio_socks::TargetAddr::Ip((*ip, port).into()),
            };
            Ok(Box::new(
                socks5(to_proxy, target, proxy).await.map_err(refused)?,
            ))
        }
        ProxyKind::Socks5 => {
            let ip = match host {
                Host::Ip(ip) => *ip,
                Host::Name(n) => tokio::net::lookup_host((n.as_str(), port))
                    .await
                    .map_err(|e| Error::Unreachable(format!("{host}: {e}")))?
                    .next()
                    .ok_or_else(|| Error::Unreachable(format!("{host}: no address")))?
                    .ip(),
            };
            let target = tokio_socks::TargetAddr::Ip((ip, port).into());
            Ok(Box::new(
                socks5(to_proxy, target, proxy).await.map_err(refused)?,
            ))
        }
        ProxyKind::HttpConnect => {
            let stream = http_connect::connect(
                to_proxy,
                &format!("{host}:{port}"),
                proxy.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
            )
            .await
            .map_err(|e| Error::Unreachable(format!("proxy {shown}: {e}")))?;
            Ok(Box::new(stream))
        }
    }
}

async fn socks5(
    socket: TcpStream,
    target: tokio_socks::TargetAddr<'_>,
    proxy: &Proxy,
) -> Result<Socks5Stream<TcpStream>, tokio_socks::Error> {
    match &proxy.auth {
        Some((user, pass)) => {
            Socks5Stream::connect_with_password_and_socket(socket, target, user, pass).await
        }
        None => Socks5Stream::connect_with_socket(socket, target).await,
    }
}

/// A direct TCP connection (a name is resolved by the system here).
async fn tcp(host: &Host, port: u16) -> Result<TcpStream> {
    let stream = match host {
        Host::Name(n) => TcpStream::connect((n.as_str(), port)).await,
        Host::Ip(ip) => TcpStream::connect((*ip, port)).await,
    }
    .map_err(|e| Error::Unreachable(format!("{host}:{port}: {e}")))?;
    // Requests are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
