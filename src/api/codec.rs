//! The prost codec, except that a request that fails to decode (invalid UTF-8 in a
//! string field, a truncated message, a wrong wire type) is the client's fault and is
//! answered INVALID_ARGUMENT naming the field, rather than tonic's INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstCodec;

/// A [`ProstCodec`] whose decoder maps decode errors to INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct ValidatingCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for ValidatingCodec<T, U> {
    fn default() -> Self {
        Self {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ValidatingCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ValidatingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ValidatingDecoder { _pd: PhantomData }
    }
}

/// Decodes `U` with prost; see [`ValidatingCodec`].
#[derive(Debug)]
pub struct ValidatingDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for ValidatingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost's message names the message and field path, e.g.
        // "LogMetricsRequest.key: invalid string value: data is not UTF-8 encoded".
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
