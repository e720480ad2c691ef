//! Tests of the transport's layers against real parts: a TLS server with generated
//! certificates, a real SOCKS5 proxy (`microsocks`), an HTTP CONNECT proxy and a relay written
//! here, and the ClientHello our connector sends (its JA4 fingerprint). One file per topic;
//! the servers they share live in `support`.

mod ja4;
mod keepalive;
mod plaintext;
mod proxy;
mod relay;
mod support;
mod tls;
