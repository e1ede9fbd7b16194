//! The request body of a call, held to arriving whole (and a unary call's, in time).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use http_body::Frame;
use tokio::time::Sleep;
use tonic::{Status, body::Body};

use crate::error::ApiError;

/// The length of a gRPC message's prefix: a compression flag and a big-endian length.
const PREFIX_LEN: usize = 5;

/// A unary call's request body (every ApiKeys RPC and Envoy's Check are unary), which must
/// end within `timeout` of the first time it kept its reader waiting (the timer is made only
/// then: a body that arrives with its headers costs none), and must end on a whole gRPC
/// message. tonic answers a body that ends early, or carries no message, INTERNAL; that is
/// the caller's mistake, answered INVALID_ARGUMENT (`REQUEST_UNDECODABLE`) here.
///
/// A ValidateKeys stream's body ([`UnaryBody::stream`]) has no timeout (a gateway's stream
/// may wait between requests as long as it likes) and may carry no message at all, but must
/// still end on a message boundary.
pub(super) struct UnaryBody {
    inner: Body,
    /// `None` for a stream.
    timeout: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    framing: Framing,
    ended: bool,
}

impl UnaryBody {
    pub(super) fn new(inner: Body, timeout: Duration) -> Self {
        Self {
            inner,
            timeout: Some(timeout),
            timer: None,
            framing: Framing::default(),
            ended: false,
        }
    }

    /// A streaming call's body: whole messages, without a time limit.
    pub(super) fn stream(inner: Body) -> Self {
        Self {
            timeout: None,
            ..Self::new(inner, Duration::ZERO)
        }
    }

    /// Whether the body read so far may end here.
    fn may_end(&self) -> bool {
        match self.timeout {
            Some(_) => self.framing.whole(),
            None => self.framing.at_boundary(),
        }
    }

    fn fail(&mut self, error: ApiError) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.ended = true;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl http_body::Body for UnaryBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) if !this.may_end() => this.fail(ApiError::RequestUndecodable),
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && this.framing.read(data).is_err()
                {
                    return this.fail(ApiError::RequestUndecodable);
                }
                if this.inner.is_end_stream() && !this.may_end() {
                    return this.fail(ApiError::RequestUndecodable);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status))),
            Poll::Pending => {
                let Some(timeout) = this.timeout else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.fail(ApiError::RequestBodyTimeout(timeout)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Where a body stands in gRPC's length-prefixed messages.
#[derive(Debug, Default)]
struct Framing {
    prefix: [u8; PREFIX_LEN],
    /// Bytes of the current prefix read so far.
    prefix_read: usize,
    /// Bytes of the current message still to come.
    message_left: u64,
    messages: u32,
}

/// A compression flag other than 0 (none) and 1 (compressed).
#[derive(Debug, PartialEq, Eq)]
struct BadFlag;

impl Framing {
    fn read(&mut self, mut data: &[u8]) -> Result<(), BadFlag> {
        while data.has_remaining() {
            if self.message_left > 0 {
                let taken = self.message_left.min(data.len() as u64);
                self.message_left -= taken;
                data.advance(taken as usize);
                if self.message_left == 0 {
                    self.messages += 1;
                }
                continue;
            }
            let taken = (PREFIX_LEN - self.prefix_read).min(data.len());
            self.prefix[self.prefix_read..self.prefix_read + taken].copy_from_slice(&data[..taken]);
            self.prefix_read += taken;
            data.advance(taken);
            if self.prefix_read == PREFIX_LEN {
                self.prefix_read = 0;
                if self.prefix[0] > 1 {
                    return Err(BadFlag);
                }
                let [_, a, b, c, d] = self.prefix;
                self.message_left = u64::from(u32::from_be_bytes([a, b, c, d]));
                if self.message_left == 0 {
                    self.messages += 1;
                }
            }
        }
        Ok(())
    }

    /// Whether the body read so far is one or more whole messages.
    fn whole(&self) -> bool {
        self.messages > 0 && self.at_boundary()
    }

    /// Whether the body read so far ends between messages (or before the first).
    fn at_boundary(&self) -> bool {
        self.prefix_read == 0 && self.message_left == 0
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn body(bytes: &'static [u8]) -> UnaryBody {
        UnaryBody::new(
            Body::new(http_body_util::Full::new(Bytes::from_static(bytes))),
            Duration::from_secs(2),
        )
    }

    #[tokio::test]
    async fn a_body_that_never_arrives_is_given_up_after_the_timeout() {
        let (_sender, frames) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(1);
        let frames = tokio_stream::wrappers::ReceiverStream::new(frames);
        let timeout = Duration::from_millis(50);
        let mut body = UnaryBody::new(Body::new(http_body_util::StreamBody::new(frames)), timeout);
        let started = tokio::time::Instant::now();

        let status = body.frame().await.unwrap().unwrap_err();

        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(started.elapsed() >= timeout);
    }

    #[tokio::test]
    async fn a_whole_message_is_read_as_it_came_and_costs_no_timer() {
        let mut body = body(b"\x00\x00\x00\x00\x02hi");
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&data[..], b"\x00\x00\x00\x00\x02hi");
        assert!(body.frame().await.is_none());
        assert!(body.timer.is_none());
    }

    #[tokio::test]
    async fn a_body_without_a_whole_message_is_undecodable() {
        for cut in [
            &b""[..],
            b"\x00\x00\x00",
            b"\x00\x00\x00\x00\x05abc",
            b"\x07\x00\x00\x00\x00",
        ] {
            let mut body = UnaryBody::new(
                Body::new(http_body_util::Full::new(Bytes::from_static(cut))),
                Duration::from_secs(2),
            );
            let status = loop {
                match body.frame().await {
                    Some(Ok(_)) => continue,
                    Some(Err(status)) => break status,
                    None => panic!("{cut:?} was taken as whole"),
                }
            };
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{cut:?}");
        }
    }

    #[tokio::test]
    async fn a_stream_may_carry_no_message_but_must_end_between_messages() {
        let mut empty = UnaryBody::stream(Body::empty());
        assert!(empty.frame().await.is_none(), "an empty stream is whole");
        let mut cut = UnaryBody::stream(Body::new(http_body_util::Full::new(Bytes::from_static(
            b"\x00\x00\x00\x00\x02hi\x00\x00",
        ))));
        let status = cut.frame().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn messages_are_followed_across_frames() {
        let mut framing = Framing::default();
        let pieces = [
            &b"\x00\x00"[..],
            b"\x00\x00\x03a",
            b"bc",
            b"\x00\x00",
            b"\x00\x00\x00",
        ];
        let whole_after = [false, false, true, false, true];
        for (piece, whole) in pieces.into_iter().zip(whole_after) {
            framing.read(piece).unwrap();
            assert_eq!(framing.whole(), whole, "after {piece:?}");
        }
        assert_eq!(framing.messages, 2);
    }
}
