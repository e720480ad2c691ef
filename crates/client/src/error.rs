//! The client library's errors, grouped by who is at fault: the user's request, the server,
//! the network, or local state. The CLI prints `Display` as its one-line reason.

use blindpost_wire::ErrorCode;

/// Everything that can go wrong in the client library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- the user's request -------------------------------------------------------------
    /// The profile has not been set up yet.
    #[error("this profile is not set up; run `blindpost setup --server URL --username NAME` first")]
    NotSetUp,
    /// The profile is already set up.
    #[error("this profile is already set up as @{0}")]
    AlreadySetUp(String),
    /// No such user in the server's directory.
    #[error("unknown user @{0}")]
    UnknownUser(String),
    /// The username is malformed.
    #[error("invalid username {0:?}: use 2-32 lowercase letters, digits, '_', '-' or '.'")]
    InvalidUsername(String),
    /// The username is taken by someone else.
    #[error("username @{0} is taken")]
    UsernameTaken(String),
    /// No chat matches the target.
    #[error("no chat named {0:?}")]
    UnknownChat(String),
    /// More than one chat matches the target.
    #[error("{0:?} matches several chats; use '#' and a prefix of the group id: {1}")]
    AmbiguousChat(String, String),
    /// The operation needs membership the user does not have.
    #[error("not a member of {0}")]
    NotAMember(String),
    /// The request makes no sense (adding an existing member, …).
    #[error("{0}")]
    Invalid(String),
    /// A commit (with its Welcome) would not fit in one frame. Adding members splits the
    /// additions by itself; a single member's commit this large cannot be sent.
    #[error(
        "this change makes a commit of {0} bytes, more than one message may carry; change \
         fewer members at once"
    )]
    CommitTooLarge(usize),

    // --- the server -----------------------------------------------------------------------
    /// The server answered with an error.
    #[error("server refused: {message} ({code:?})")]
    Server {
        /// The wire error code.
        code: ErrorCode,
        /// The server's message.
        message: String,
        /// The group's epoch, with `StaleEpoch`.
        current_epoch: u64,
    },
    /// The server sent something that violates the protocol or does not verify.
    #[error("the server sent an invalid reply: {0}")]
    BadServerReply(String),
    /// The key directory is inconsistent (a proof fails, a root forks or rolls back, or our own
    /// username shows a value our devices did not publish): the server may be substituting
    /// keys. Nothing was encrypted to any key from the failing answer.
    #[error("KEY DIRECTORY ALARM: {0}. The server may be substituting keys; do not trust it")]
    DirectoryAlarm(String),
    /// A contact whose safety number was confirmed now has another identity key; sending to
    /// them is blocked until the user accepts the change.
    #[error(
        "@{0}'s identity key changed since you confirmed their safety number; compare it again \
         (`blindpost verify @{0}`), then accept it with `blindpost verify @{0} --accept-change`"
    )]
    KeyChanged(String),

    // --- the network -----------------------------------------------------------------------
    /// The server could not be reached or the connection broke. With several servers or
    /// relays, one summary per failed attempt, separated by `; `.
    #[error("server unreachable: {0}")]
    Unreachable(String),
    /// A server's or relay's TLS certificate matched neither its pins nor (without pins) the
    /// trusted roots. Someone may be intercepting the connection; nothing was sent over it
    /// and no other check was tried in its place.
    #[error("{0}")]
    Certificate(String),

    // --- local state --------------------------------------------------------------------------
    /// The local store failed.
    #[error("local store: {0}")]
    Store(#[from] rusqlite::Error),
    /// A file operation on the profile failed.
    #[error("profile directory: {0}")]
    Io(#[from] std::io::Error),
    /// MLS rejected an operation on local state.
    #[error("MLS: {0}")]
    Mls(String),
    /// The profile was written by an older blindpost in a store format this one does not read.
    #[error(
        "this profile was written by an older blindpost (store format {0}) and cannot be read; \
         set up a new profile in another directory"
    )]
    OldProfile(u32),
}

impl Error {
    /// Whether this is a server `StaleEpoch` answer (the group moved on: catch up and retry).
    pub fn is_stale_epoch(&self) -> bool {
        matches!(
            self,
            Error::Server {
                code: ErrorCode::StaleEpoch,
                ..
            }
        )
    }

    pub(crate) fn mls(e: impl std::fmt::Display) -> Self {
        Error::Mls(e.to_string())
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
