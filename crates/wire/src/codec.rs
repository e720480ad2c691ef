//! Frame codec: bytes ↔ [`ClientFrame`] / [`ServerFrame`]. Checks the frame-size limit before
//! decoding, so a peer cannot make us allocate more than [`MAX_FRAME_BYTES`] for one frame.

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

/// Encode any frame.
pub fn encode(frame: &impl Message) -> Vec<u8> {
    frame.encode_to_vec()
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
