//! The framing of a request that carries one message (every setpoint.v1 call: unary, or a
//! server stream such as WatchInstance): the body must be exactly one gRPC frame — a zero
//! "compressed" flag, a four-byte length, and that many bytes — and no larger than the
//! server's message limit.
//!
//! tonic answers a body that ends inside a frame, or has no frame at all, with `INTERNAL`
//! and its own wording; that blames the server for the client's bytes. Reading the body here
//! first (tonic reads all of it before decoding anyway, so nothing is held longer) lets every
//! framing fault get `INVALID_ARGUMENT` with a sentence of ours, and tonic then only ever
//! sees one well-formed frame. Compressed requests are refused too: the server accepts no
//! `grpc-encoding`. (The gRPC compression document asks for `INTERNAL` when the flag is set
//! without an encoding; here that is bad input like any other.)

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full, Limited};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::Request;

use super::codec::malformed;

/// The length of a gRPC frame's header: the compressed flag and the length.
const HEADER: usize = 5;

/// Why a request body is not one well-formed message frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// No frame at all.
    #[error("the request has no message")]
    Empty,
    /// The body ends inside a frame.
    #[error("the request ends inside its message frame")]
    Truncated,
    /// More after the first frame.
    #[error("the request has more than one message")]
    Trailing,
    /// The compressed flag is set (or is not a flag).
    #[error("compressed request messages are not accepted")]
    Compressed,
    /// Larger than the server's limit.
    #[error("the request message is larger than the server's limit of {0} bytes")]
    TooLarge(usize),
    /// The body could not be read (the client went away or broke the stream).
    #[error("the request body could not be read")]
    Unreadable,
}

impl From<FrameError> for Status {
    fn from(e: FrameError) -> Status {
        match e {
            // The same code tonic gives a message over the limit.
            FrameError::TooLarge(_) => Status::out_of_range(e.to_string()),
            FrameError::Unreadable => Status::cancelled(e.to_string()),
            _ => malformed(&e.to_string()),
        }
    }
}

/// Checks that `body` is exactly one uncompressed frame of at most `max` message bytes.
///
/// # Errors
/// The [`FrameError`] that describes the first fault.
pub fn check(body: &[u8], max: usize) -> Result<(), FrameError> {
    let mut rest = body;
    if rest.is_empty() {
        return Err(FrameError::Empty);
    }
    if rest.len() < HEADER {
        return Err(FrameError::Truncated);
    }
    let flag = rest.get_u8();
    let len = rest.get_u32() as usize;
    if flag != 0 {
        return Err(FrameError::Compressed);
    }
    if len > max {
        return Err(FrameError::TooLarge(max));
    }
    match rest.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(FrameError::Truncated),
        std::cmp::Ordering::Greater => Err(FrameError::Trailing),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// Reads `request`'s body (at most one frame of `max` bytes, plus one byte to tell a longer
/// body), checks it with [`check`], and hands back the request with the bytes as its body.
///
/// # Errors
/// The [`FrameError`] of a body that is not one well-formed frame.
pub async fn buffer(request: Request<Body>, max: usize) -> Result<Request<Body>, FrameError> {
    let (parts, body) = request.into_parts();
    let limit = max.saturating_add(HEADER + 1);
    let bytes: Bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(FrameError::TooLarge(max));
        }
        Err(_) => return Err(FrameError::Unreadable),
    };
    check(&bytes, max)?;
    Ok(Request::from_parts(parts, Body::new(Full::new(bytes))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flag: u8, declared: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&declared.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn exactly_one_uncompressed_frame_within_the_limit() {
        assert_eq!(check(&frame(0, 3, b"abc"), 10), Ok(()));
        assert_eq!(check(&frame(0, 0, b""), 10), Ok(()));
        assert_eq!(check(b"", 10), Err(FrameError::Empty));
        assert_eq!(check(&[0, 0, 0], 10), Err(FrameError::Truncated));
        assert_eq!(check(&frame(0, 4, b"abc"), 10), Err(FrameError::Truncated));
        assert_eq!(check(&frame(0, 2, b"abc"), 10), Err(FrameError::Trailing));
        let mut two = frame(0, 1, b"a");
        two.extend(frame(0, 1, b"b"));
        assert_eq!(check(&two, 10), Err(FrameError::Trailing));
        assert_eq!(check(&frame(1, 3, b"abc"), 10), Err(FrameError::Compressed));
        assert_eq!(check(&frame(7, 3, b"abc"), 10), Err(FrameError::Compressed));
        assert_eq!(
            check(&frame(0, 11, &[0; 11]), 10),
            Err(FrameError::TooLarge(10))
        );
        assert_eq!(
            check(&frame(0, u32::MAX, b""), 10),
            Err(FrameError::TooLarge(10))
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_read_to_its_end() {
        let big = frame(0, 100, &[0; 100]);
        let r = Request::new(Body::new(Full::new(Bytes::from(big))));
        assert_eq!(
            buffer(r, 10).await.map(|_| ()),
            Err(FrameError::TooLarge(10))
        );
        let ok = frame(0, 3, b"abc");
        let r = Request::new(Body::new(Full::new(Bytes::from(ok.clone()))));
        let back = buffer(r, 10).await.expect("one frame");
        let bytes = back.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(bytes.as_ref(), ok.as_slice());
    }
}
