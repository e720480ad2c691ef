//! The blindpost client–server protocol: every message type, the frame codec, the limits and
//! the error codes. This crate is the one place both sides agree on bytes; it does no I/O.
//!
//! One WebSocket binary message carries exactly one frame: a [`ClientFrame`] from client to
//! server, a [`ServerFrame`] the other way. Every request carries a client-chosen `id`; the
//! server answers each with exactly one [`Response`] carrying the same id, in any order, and
//! may send [`Push`]es at any time for queues the connection subscribed to.
//!
//! The server is a blind post office: every payload here is opaque ciphertext (MLS messages
//! the clients produce). Nothing in a request names the person who sent it.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod codec;
mod messages;

pub mod limits;
pub mod link;

pub use codec::{
    DecodeError, decode_client, decode_server, encode, encode_padded, padded_len, request_fits,
};
pub use messages::*;

/// Length in bytes of a queue id.
pub const QUEUE_ID_LEN: usize = 16;
/// Length in bytes of a group id.
pub const GROUP_ID_LEN: usize = 32;
/// Length in bytes of a key-package box id.
pub const BOX_ID_LEN: usize = 16;
/// Length in bytes of a client-chosen message id (idempotency key of a post).
pub const MESSAGE_ID_LEN: usize = 16;
/// Length in bytes of every secret and token (receive secret, send token, posting token,
/// box secret) and of every hash of one.
pub const SECRET_LEN: usize = 32;

/// The path of the WebSocket endpoint, relative to the server's base URL.
pub const WS_PATH: &str = "/v1/ws";
