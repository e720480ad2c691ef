//! Size and count limits of the protocol. Both sides check them before allocating; the server
//! answers a request that breaks one with [`crate::ErrorCode::TooLarge`] or
//! [`crate::ErrorCode::InvalidArgument`].

/// Largest frame (one WebSocket binary message) either side accepts, in bytes. Chosen so a
/// post-quantum Welcome for a few hundred members fits.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Largest opaque payload (an MLS message) in a post, commit or welcome, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = MAX_FRAME_BYTES - 64 * 1024;
/// Largest single key package, in bytes.
pub const MAX_KEY_PACKAGE_BYTES: usize = 64 * 1024;
/// Most one-time key packages one publish may carry, and most a box may hold.
pub const MAX_KEY_PACKAGES_PER_BOX: usize = 200;
/// Most messages one fetch or push returns.
pub const MAX_FETCH_MESSAGES: u32 = 256;
/// Most routes one commit may add or remove, and most routes a group may have.
pub const MAX_GROUP_ROUTES: usize = 10_000;
/// Longest username, in bytes.
pub const MAX_USERNAME_BYTES: usize = 32;
/// Shortest username, in bytes.
pub const MIN_USERNAME_BYTES: usize = 2;
/// Largest signed directory entry, in bytes.
pub const MAX_DIRECTORY_ENTRY_BYTES: usize = 16 * 1024;
/// Most devices a directory entry may list.
pub const MAX_DEVICES: usize = 16;
/// Most queues one connection may subscribe to.
pub const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 4096;

/// Whether `name` is an acceptable username: 2–32 bytes of lowercase ASCII letters, digits,
/// `_`, `-` or `.`, starting with a letter or digit.
pub fn valid_username(name: &str) -> bool {
    let b = name.as_bytes();
    (MIN_USERNAME_BYTES..=MAX_USERNAME_BYTES).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.".contains(c))
}

/// Most past values of a username a `DirectoryHistory` answer proves (the most recent ones).
pub const MAX_HISTORY_VALUES: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_lowercase_ascii_within_bounds() {
        assert!(valid_username("alice"));
        assert!(valid_username("bob_2.x-y"));
        assert!(!valid_username("a"));
        assert!(!valid_username("Alice"));
        assert!(!valid_username("_alice"));
        assert!(!valid_username("al ice"));
        assert!(!valid_username(&"a".repeat(33)));
        assert!(!valid_username("ålice"));
    }
}
