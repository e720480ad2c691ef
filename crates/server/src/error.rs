//! The server's domain errors, grouped by who is at fault, and the ONE function that maps them
//! to wire error codes ([`to_wire`]). Not for: storage-backend details (see `store`), which
//! reach the client only as `Internal` / `Unavailable`.
//!
//! Messages never contain secrets, tokens or payloads: only static reasons, lengths and limits.

use std::fmt;

use blindpost_wire::{ErrorCode, Response};

use crate::store::StoreError;
use crate::types::BadLength;

/// A request the server could not or would not carry out.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The client's frame or arguments are unacceptable in themselves.
    #[error(transparent)]
    BadRequest(#[from] BadRequest),
    /// The request is well-formed but refused given the server's state.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The server failed; the request may be retried.
    #[error(transparent)]
    Server(#[from] ServerFault),
}

/// The client sent something unacceptable on its own, whatever the server holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadRequest {
    /// The frame did not decode, or a required field is missing.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A frame or field is larger than the protocol allows.
    #[error("{what} is {len} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A field has an invalid value.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl From<BadLength> for BadRequest {
    fn from(e: BadLength) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

impl From<BadLength> for ServiceError {
    fn from(e: BadLength) -> Self {
        Self::BadRequest(e.into())
    }
}

/// A well-formed request the server's state does not allow. Stores return these too, since
/// some checks (epoch compare-and-set, one-time claims) must happen inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The thing named does not exist.
    #[error("{0} not found")]
    NotFound(Entity),
    /// A secret, token or signature did not match.
    #[error("{0} did not match")]
    Forbidden(Credential),
    /// An id or username is taken, or an update conflicts with what is stored.
    #[error("{0}")]
    Conflict(ConflictKind),
    /// The group is at another epoch.
    #[error("the group is at epoch {current_epoch}")]
    StaleEpoch {
        /// The group's current epoch.
        current_epoch: u64,
    },
    /// A count or rate limit is reached.
    #[error("limit reached: {0}")]
    LimitExceeded(Limit),
}

/// What was not found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Entity {
    /// A queue.
    Queue,
    /// A group.
    Group,
    /// A key-package box, or a box with nothing left to hand out.
    KeyPackageBox,
    /// A username.
    User,
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Queue => "queue",
            Self::Group => "group",
            Self::KeyPackageBox => "key package",
            Self::User => "user",
        })
    }
}

/// Which proof failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credential {
    /// A queue's receive secret.
    ReceiveSecret,
    /// A queue's send token.
    SendToken,
    /// A group epoch's posting token.
    PostingToken,
    /// A key-package box's secret.
    BoxSecret,
    /// A directory entry's signature.
    Signature,
    /// The queue was not authenticated on this connection by `Subscribe`.
    Subscription,
}

impl fmt::Display for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ReceiveSecret => "receive secret",
            Self::SendToken => "send token",
            Self::PostingToken => "posting token",
            Self::BoxSecret => "box secret",
            Self::Signature => "signature",
            Self::Subscription => "queue subscription on this connection",
        })
    }
}

/// Why a create or update conflicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConflictKind {
    /// The queue id exists.
    QueueExists,
    /// The group id exists.
    GroupExists,
    /// The username belongs to another identity key.
    UsernameTaken,
    /// An update did not raise the entry's version.
    VersionNotIncreased,
}

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::QueueExists => "a queue with this id exists",
            Self::GroupExists => "a group with this id exists",
            Self::UsernameTaken => "the username belongs to another identity key",
            Self::VersionNotIncreased => "the entry's version must be higher than the stored one",
        })
    }
}

/// Which limit was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// Queues subscribed on one connection.
    Subscriptions,
    /// One-time key packages in one publish or one box.
    KeyPackages,
    /// Routes in one commit or one group.
    GroupRoutes,
    /// Key-package claims per connection per minute.
    ClaimRate,
    /// Key-package claims one box serves per hour.
    BoxClaimRate,
    /// Requests per connection per second.
    RequestRate,
    /// Unacknowledged bytes one queue may hold.
    QueueBytes,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Subscriptions => "too many subscriptions on this connection",
            Self::KeyPackages => "too many one-time key packages",
            Self::GroupRoutes => "too many group routes",
            Self::ClaimRate => "too many key-package claims; slow down",
            Self::BoxClaimRate => {
                "this user's key packages are being claimed too often; try again later"
            }
            Self::RequestRate => "too many requests on this connection; slow down",
            Self::QueueBytes => {
                "a recipient's queue is full (too much unread mail); try again later"
            }
        })
    }
}

/// The server failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ServerFault {
    /// The storage backend failed. The detail is for logs, never sent to clients.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The storage is full; nothing was stored. The detail is for logs.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    Unavailable,
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Refused(r) => Self::Refused(r),
            StoreError::Backend(detail) => Self::Server(ServerFault::Storage(detail)),
            StoreError::Full(detail) => Self::Server(ServerFault::StorageFull(detail)),
            StoreError::Closed => Self::Server(ServerFault::Unavailable),
        }
    }
}

/// Maps an error to the wire response answering request `id`: the one place codes are chosen.
pub fn to_wire(id: u64, err: &ServiceError) -> Response {
    let (code, epoch) = match err {
        ServiceError::BadRequest(b) => match b {
            BadRequest::Malformed(_) => (ErrorCode::Malformed, 0),
            BadRequest::TooLarge { .. } => (ErrorCode::TooLarge, 0),
            BadRequest::InvalidArgument(_) => (ErrorCode::InvalidArgument, 0),
        },
        ServiceError::Refused(r) => match r {
            Refusal::NotFound(_) => (ErrorCode::NotFound, 0),
            Refusal::Forbidden(_) => (ErrorCode::Forbidden, 0),
            Refusal::Conflict(_) => (ErrorCode::Conflict, 0),
            Refusal::StaleEpoch { current_epoch } => (ErrorCode::StaleEpoch, *current_epoch),
            Refusal::LimitExceeded(_) => (ErrorCode::LimitExceeded, 0),
        },
        ServiceError::Server(s) => match s {
            ServerFault::Storage(_) => (ErrorCode::Internal, 0),
            ServerFault::StorageFull(_) => (ErrorCode::Unavailable, 0),
            ServerFault::Unavailable => (ErrorCode::Unavailable, 0),
        },
    };
    let message = match err {
        // Backend details stay in the server's logs.
        ServiceError::Server(ServerFault::Storage(_)) => "internal storage error".to_owned(),
        ServiceError::Server(ServerFault::StorageFull(_)) => {
            "the server's storage is full; nothing was stored, retry later".to_owned()
        }
        other => other.to_string(),
    };
    Response::error_with_epoch(id, code, message, epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blindpost_wire::response::Body;

    fn code_of(err: ServiceError) -> (ErrorCode, String, u64) {
        let Some(Body::Error(e)) = to_wire(9, &err).body else {
            panic!("expected an error body");
        };
        (e.code(), e.message, e.current_epoch)
    }

    #[test]
    fn every_fault_maps_to_its_code() {
        let cases: Vec<(ServiceError, ErrorCode)> = vec![
            (
                BadRequest::Malformed("x".into()).into(),
                ErrorCode::Malformed,
            ),
            (
                BadRequest::TooLarge {
                    what: "payload",
                    len: 2,
                    limit: 1,
                }
                .into(),
                ErrorCode::TooLarge,
            ),
            (
                BadRequest::InvalidArgument("x".into()).into(),
                ErrorCode::InvalidArgument,
            ),
            (Refusal::NotFound(Entity::Queue).into(), ErrorCode::NotFound),
            (
                Refusal::Forbidden(Credential::SendToken).into(),
                ErrorCode::Forbidden,
            ),
            (
                Refusal::Conflict(ConflictKind::QueueExists).into(),
                ErrorCode::Conflict,
            ),
            (
                Refusal::StaleEpoch { current_epoch: 4 }.into(),
                ErrorCode::StaleEpoch,
            ),
            (
                Refusal::LimitExceeded(Limit::ClaimRate).into(),
                ErrorCode::LimitExceeded,
            ),
            (
                ServerFault::Storage("disk".into()).into(),
                ErrorCode::Internal,
            ),
            (ServerFault::Unavailable.into(), ErrorCode::Unavailable),
            (
                ServerFault::StorageFull("disk".into()).into(),
                ErrorCode::Unavailable,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(code_of(err).0, code);
        }
    }

    #[test]
    fn stale_epoch_carries_the_current_epoch() {
        let (code, message, epoch) = code_of(Refusal::StaleEpoch { current_epoch: 41 }.into());
        assert_eq!(code, ErrorCode::StaleEpoch);
        assert_eq!(epoch, 41);
        assert!(message.contains("41"));
    }

    #[test]
    fn storage_details_are_not_sent_to_clients() {
        let (_, message, _) = code_of(ServerFault::Storage("SQL: table x is locked".into()).into());
        assert_eq!(message, "internal storage error");
    }

    #[test]
    fn store_errors_keep_their_fault_group() {
        let e: ServiceError = StoreError::Refused(Refusal::NotFound(Entity::Group)).into();
        assert!(matches!(
            e,
            ServiceError::Refused(Refusal::NotFound(Entity::Group))
        ));
        let e: ServiceError = StoreError::Closed.into();
        assert!(matches!(e, ServiceError::Server(ServerFault::Unavailable)));
    }
}
