//! Frame codec: bytes ↔ [`ClientFrame`] / [`ServerFrame`]. Checks the frame-size limit before
//! decoding, so a peer cannot make us allocate more than [`MAX_FRAME_BYTES`] for one frame, and
//! pads frames for the network to size buckets, so a frame's size does not tell a post from an
//! acknowledgement.

use prost::Message;

use crate::limits::MAX_FRAME_BYTES;
use crate::{ClientFrame, ServerFrame};

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame is larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge {
        /// The frame's length.
        len: usize,
    },
    /// The bytes are not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
}

/// Most bytes a [`ClientFrame`] adds around its request: the id (at most 11) and the
/// request's field tag and length (at most 2 and 5).
const REQUEST_HEADROOM: usize = 18;

/// Whether a request whose own encoding is `len` bytes fits in a frame under
/// [`MAX_FRAME_BYTES`], whatever its id.
pub fn request_fits(len: usize) -> bool {
    len.saturating_add(REQUEST_HEADROOM) <= MAX_FRAME_BYTES
}

/// Encode any frame, unpadded (snapshots, sizes, storage).
pub fn encode(frame: &impl Message) -> Vec<u8> {
    frame.encode_to_vec()
}

/// The protobuf field number of padding. No frame type uses it, so every decoder skips it as
/// an unknown field (protobuf's rule), old peers included.
const PADDING_FIELD: u32 = 100;
/// The smallest padded frame.
const MIN_BUCKET: usize = 256;
/// Past this size frames are padded to a multiple of it rather than a power of two, so a
/// large frame costs at most this much more.
const LARGE_STEP: usize = 64 * 1024;

/// Encode a frame for the network: padded with an unknown field to its size bucket (256
/// bytes, then powers of two up to 64 KiB, then multiples of 64 KiB, never past
/// [`MAX_FRAME_BYTES`]). It decodes to the same frame.
pub fn encode_padded(frame: &impl Message) -> Vec<u8> {
    let mut bytes = frame.encode_to_vec();
    pad_to_bucket(&mut bytes);
    bytes
}

/// The bucket a frame of `len` bytes is padded to.
pub fn padded_len(len: usize) -> usize {
    let bucket = if len <= MIN_BUCKET {
        MIN_BUCKET
    } else if len <= LARGE_STEP {
        len.next_power_of_two()
    } else {
        len.div_ceil(LARGE_STEP) * LARGE_STEP
    };
    bucket.min(MAX_FRAME_BYTES.max(len))
}

fn pad_to_bucket(bytes: &mut Vec<u8>) {
    let tag = u64::from(PADDING_FIELD << 3 | 2);
    let tag_len = prost::encoding::encoded_len_varint(tag);
    let mut target = padded_len(bytes.len());
    // The smallest padding field (tag and a zero length) may not fit in what is left of the
    // bucket: then the frame goes in the next one.
    if target - bytes.len() < tag_len + 1 {
        target = padded_len(target + 1);
        if target - bytes.len() < tag_len + 1 {
            return; // at the frame limit: sent as it is
        }
    }
    // Fill `target - len` with padding fields: tag, varint length, zeros. A length and its
    // varint cannot always sum to the gap exactly (at 128, 16384, …), so empty fields take
    // up the difference first.
    let mut gap = target - bytes.len();
    bytes.reserve(gap);
    loop {
        let body = gap - tag_len;
        if let Some(len) = (1..=4).find_map(|v| {
            let len = body.checked_sub(v)?;
            (prost::encoding::encoded_len_varint(len as u64) == v).then_some(len)
        }) {
            prost::encoding::encode_varint(tag, bytes);
            prost::encoding::encode_varint(len as u64, bytes);
            bytes.resize(bytes.len() + len, 0);
            return;
        }
        prost::encoding::encode_varint(tag, bytes);
        bytes.push(0);
        gap -= tag_len + 1;
    }
}

/// Decode a frame sent by a client.
pub fn decode_client(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    check_len(bytes)?;
    Ok(ClientFrame::decode(bytes)?)
}

/// Decode a frame sent by a server.
pub fn decode_server(bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    check_len(bytes)?;
    Ok(ServerFrame::decode(bytes)?)
}

fn check_len(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge { len: bytes.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ping, Request, Response, response};

    #[test]
    fn client_frame_round_trips() {
        let frame = ClientFrame {
            id: 7,
            request: Some(Request::Ping(Ping {})),
        };
        let back = decode_client(&encode(&frame)).expect("valid frame decodes");
        assert_eq!(back, frame);
    }

    #[test]
    fn server_frame_round_trips_errors_with_codes() {
        let frame: ServerFrame =
            Response::error_with_epoch(3, crate::ErrorCode::StaleEpoch, "x", 9).into();
        let back = decode_server(&encode(&frame)).expect("valid frame decodes");
        let Some(crate::server_frame::Kind::Response(r)) = back.kind else {
            panic!("expected a response, got {back:?}");
        };
        let Some(response::Body::Error(e)) = r.body else {
            panic!("expected an error body");
        };
        assert_eq!(e.code(), crate::ErrorCode::StaleEpoch);
        assert_eq!(e.current_epoch, 9);
    }

    #[test]
    fn oversized_frames_are_refused_before_decoding() {
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            decode_client(&big),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(matches!(
            decode_client(&[0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn padded_frames_fall_in_buckets_and_decode_to_the_same_frame() {
        for size in [
            0usize, 1, 100, 200, 250, 253, 254, 255, 256, 300, 5000, 16_380, 70_000,
        ] {
            let frame = ClientFrame {
                id: 9,
                request: Some(Request::Post(crate::Post {
                    payload: vec![7; size],
                    ..Default::default()
                })),
            };
            let plain = encode(&frame);
            let padded = encode_padded(&frame);
            assert!(padded.len() >= plain.len());
            let bucket = padded.len();
            assert!(
                bucket == 256
                    || (bucket <= 64 * 1024 && bucket.is_power_of_two())
                    || bucket.is_multiple_of(64 * 1024),
                "{size}: {bucket} is no bucket"
            );
            assert_eq!(decode_client(&padded).expect("padded decodes"), frame);
        }
        // Every gap a bucket can leave is filled exactly, the awkward varint sizes included.
        for len in 0..=20_000usize {
            let mut bytes = vec![0x08, 0x01];
            bytes.resize(len.max(2), 0x08);
            let mut padded = bytes.clone();
            pad_to_bucket(&mut padded);
            let want = padded_len(bytes.len());
            assert!(
                padded.len() == want || padded.len() == padded_len(want + 1),
                "{len}: {} bytes",
                padded.len()
            );
        }
    }

    #[test]
    fn an_acknowledgement_and_a_small_post_are_the_same_size_on_the_wire() {
        let ack = ClientFrame {
            id: 1,
            request: Some(Request::Ping(Ping {})),
        };
        let post = ClientFrame {
            id: 2,
            request: Some(Request::Post(crate::Post {
                group_id: vec![1; 32],
                posting_token: vec![2; 32],
                message_id: vec![3; 16],
                payload: vec![4; 120],
                ..Default::default()
            })),
        };
        assert_eq!(encode_padded(&ack).len(), encode_padded(&post).len());
        assert_eq!(
            decode_server(&encode_padded(&ServerFrame::default()))
                .expect("padded server frame decodes"),
            ServerFrame::default()
        );
    }

    #[test]
    fn wire_encoding_of_a_post_is_stable() {
        // Snapshot: field tags are the contract; this pins them.
        let frame = ClientFrame {
            id: 1,
            request: Some(Request::Post(crate::Post {
                group_id: vec![1],
                epoch: 2,
                posting_token: vec![3],
                message_id: vec![4],
                payload: vec![5],
                skip_subscribed: true,
                fresh_id: true,
            })),
        };
        assert_eq!(
            hex(&encode(&frame)),
            "080172120a010110021a01032201042a010530013801"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
