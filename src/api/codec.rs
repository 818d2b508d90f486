//! The codec of setpoint's own gRPC servers: prost's encoding, with a decoder that answers a
//! request that does not decode (wrong wire types, a field cut short, invalid UTF-8 in a
//! string, nesting past prost's recursion limit) with `INVALID_ARGUMENT` and a sentence of our
//! own naming the message type — never the decoder's text, and never `INTERNAL`.
//!
//! tonic's `ProstCodec` maps every decode error to `INTERNAL` with prost's description, which
//! blames the server for the client's bytes and shows its internals. This codec is plugged in
//! by `build.rs` (`codec_path`) for the generated *servers* only: the generated clients keep
//! `ProstCodec`, for which a response that does not decode is rightly the server's fault.
//!
//! Framing problems (a body that ends inside a frame, two messages where one is expected, a
//! compressed flag) happen before any decoder runs; [`super::frames`] refuses them.

use std::marker::PhantomData;

use prost::{Message, Name};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::ProstEncoder;
use tonic_types::{ErrorDetails, StatusExt};

use super::errors::ERROR_DOMAIN;

/// The `ErrorInfo.reason` of a request that is not a valid message.
pub const MALFORMED_REASON: &str = "MALFORMED_REQUEST";

/// The status of a request that is not a valid `type_name` message: `INVALID_ARGUMENT`, with
/// an `ErrorInfo` of reason [`MALFORMED_REASON`].
pub fn malformed(what: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        MALFORMED_REASON,
        ERROR_DOMAIN,
        std::collections::HashMap::new(),
    );
    Status::with_error_details(Code::InvalidArgument, what, details)
}

/// Encodes answers as prost does; decodes requests with [`RequestDecoder`].
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder { _type: PhantomData }
    }
}

/// Decodes a request message `U`; see the module documentation.
#[derive(Debug, Clone)]
pub struct RequestDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Name + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        match U::decode(buf) {
            Ok(message) => Ok(Some(message)),
            Err(e) => {
                // The decoder's description stays in the server's debug log, for whoever
                // debugs a client; the caller gets our sentence.
                tracing::debug!(message = U::full_name(), error = %e, "a request did not decode");
                Err(malformed(&format!(
                    "the request is not a valid {} message",
                    U::full_name()
                )))
            }
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
