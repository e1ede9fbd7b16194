//! ValidateKeys: a gateway's stream of validations, each answered as it is read.

use tonic::{Status, Streaming};

use super::{ApiKeysService, Judgement};
use crate::{
    error::ApiError,
    grpc::proto::{ValidateKeysRequest, ValidateKeysResponse},
};

/// The answers of a ValidateKeys stream: each request judged when it is read, so a key
/// deleted before then is never VALID. Polled only when the connection can take more
/// answers, so a client that stops reading stops being read from (HTTP/2 flow control does
/// the rest): nothing here buffers. The first error ends the stream.
pub struct Validations {
    service: ApiKeysService,
    requests: Streaming<ValidateKeysRequest>,
    /// Ready once the server drains: looked at whenever the client has nothing more for
    /// now, and every [`DRAIN_CHECK_EVERY`] requests of a client that never pauses.
    draining: Option<DrainFuture>,
    since_drain_check: u32,
    ended: bool,
    /// The answer to the request read last, when its key's credits wait for a lease: the
    /// next request is read once it is answered.
    leasing: Option<LeasingFuture>,
}

type LeasingFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<ValidateKeysResponse, Status>> + Send>,
>;

type DrainFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

const DRAIN_CHECK_EVERY: u32 = 256;

impl Validations {
    pub(super) fn new(
        service: ApiKeysService,
        requests: Streaming<ValidateKeysRequest>,
        draining: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Self {
        let draining = draining.map(|mut draining| -> DrainFuture {
            Box::pin(async move {
                // An error means the server is gone, which is draining too.
                let _ = draining.wait_for(|draining| *draining).await;
            })
        });
        Self {
            service,
            requests,
            draining,
            since_drain_check: 0,
            ended: false,
            leasing: None,
        }
    }

    /// Whether the server drains (and if not, a wake-up when it does).
    fn drained(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.since_drain_check = 0;
        self.draining
            .as_mut()
            .is_some_and(|draining| draining.as_mut().poll(cx).is_ready())
    }

    fn end_draining(&mut self) -> Status {
        self.ended = true;
        ApiError::ShuttingDown.into()
    }

    /// The answer to `request`, or `None` when it waits for a lease (then in `leasing`).
    fn answer(
        &mut self,
        request: ValidateKeysRequest,
    ) -> Result<Option<ValidateKeysResponse>, Status> {
        let id = request.request_id;
        let request = request
            .request
            .ok_or(ApiError::RequestMissing)
            .map_err(|err| err.in_stream(id))?;
        let judgement = self
            .service
            .judge(&request)
            .map_err(|err| err.in_stream(id))?;
        match judgement {
            Judgement::Answer(response) => Ok(Some(ValidateKeysResponse {
                request_id: id,
                response: Some(response),
            })),
            Judgement::Lease(call) => {
                let service = self.service.clone();
                self.leasing = Some(Box::pin(async move {
                    let response = service
                        .validate_leasing(&request, call)
                        .await
                        .map_err(|err| err.in_stream(id))?;
                    Ok(ValidateKeysResponse {
                        request_id: id,
                        response: Some(response),
                    })
                }));
                Ok(None)
            }
        }
    }
}

impl tokio_stream::Stream for Validations {
    type Item = Result<ValidateKeysResponse, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        this.since_drain_check += 1;
        if this.since_drain_check >= DRAIN_CHECK_EVERY && this.drained(cx) {
            return Poll::Ready(Some(Err(this.end_draining())));
        }
        if let Some(leasing) = &mut this.leasing {
            let answer = std::task::ready!(leasing.as_mut().poll(cx));
            this.leasing = None;
            this.ended = answer.is_err();
            return Poll::Ready(Some(answer));
        }
        let answer = match std::pin::Pin::new(&mut this.requests).poll_next(cx) {
            Poll::Pending if this.drained(cx) => Err(this.end_draining()),
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(request)) => match request.and_then(|request| this.answer(request)) {
                Ok(Some(answer)) => Ok(answer),
                Ok(None) => {
                    // Waits for its lease; polled again at once to start it.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Err(status) => Err(status),
            },
        };
        self.ended = answer.is_err();
        Poll::Ready(Some(answer))
    }
}

impl std::fmt::Debug for Validations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validations").finish_non_exhaustive()
    }
}
