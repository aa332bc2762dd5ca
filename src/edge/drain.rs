//! Keeping a connection usable after an answer given before the request's
//! body was read.
//!
//! Many answers are decided from the headers alone: a 401 for a wrong key, a
//! 403, a 429 for a workspace over its day limit, a 413 from the declared
//! length. The rest of the body then still sits on the connection; left
//! there, hyper closes the connection after the answer, racing the client's
//! next request on that pooled connection, which then fails with "server
//! disconnected". So the rest is read and dropped, up to [`DRAIN_LIMIT`]
//! bytes within [`DRAIN_TIME`]; a body that goes on longer ends the
//! connection cleanly instead, announced with `Connection: close`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot::{self, error::TryRecvError};

/// The most of an unread body that is read to keep its connection.
const DRAIN_LIMIT: usize = 1 << 20;
/// The longest the answer waits for that.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// A request body that, when dropped before its end, hands what is left to
/// [`KeepConnectionUsable`].
struct Tracked {
    inner: Body,
    leftover: Option<oneshot::Sender<Body>>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(leftover) = self.leftover.take()
            && !self.inner.is_end_stream()
        {
            let _ = leftover.send(std::mem::take(&mut self.inner));
        }
    }
}

/// Reads and drops `body`; whether it ended within [`DRAIN_LIMIT`].
async fn read_to_end(body: Body) -> bool {
    let mut limited = http_body_util::Limited::new(body, DRAIN_LIMIT);
    while let Some(frame) = limited.frame().await {
        if frame.is_err() {
            return false;
        }
    }
    true
}

/// Whether `draining` finished within [`DRAIN_TIME`] and said it did.
async fn within_drain_time(draining: impl Future<Output = bool>) -> bool {
    tokio::time::timeout(DRAIN_TIME, draining)
        .await
        .unwrap_or(false)
}

/// The middleware around `inner`: see the module's documentation. Written
/// as a service of its own, rather than with axum's `from_fn`, which boxes
/// and clones the service inside on every request.
#[derive(Clone)]
pub struct KeepConnectionUsable<S> {
    inner: S,
}

impl<S> KeepConnectionUsable<S> {
    pub fn layer() -> impl tower::Layer<S, Service = Self> + Clone {
        tower::layer::layer_fn(|inner| Self { inner })
    }
}

impl<S, B> tower::Service<Request> for KeepConnectionUsable<S>
where
    S: tower::Service<Request, Response = axum::http::Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let (parts, body) = request.into_parts();
        // An empty body has nothing to leave unread, and is not tracked.
        let (body, unread) = if body.is_end_stream() {
            (body, None)
        } else {
            let (leftover, unread) = oneshot::channel();
            let tracked = Body::new(Tracked {
                inner: body,
                leftover: Some(leftover),
            });
            (tracked, Some(unread))
        };
        let answering = self.inner.call(Request::from_parts(parts, body));
        Box::pin(async move {
            let Ok(response) = answering.await;
            let mut response = response.map(Body::new);
            if let Some(unread) = unread
                && !drained(unread).await
            {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
    }
}

/// Whether the body `unread` may hand over was read to its end, by the
/// handler or here, within the bounds.
async fn drained(mut unread: oneshot::Receiver<Body>) -> bool {
    // The body is handed over when the handler drops it unread; a body read
    // to its end is not (the channel closes empty), which is the usual case
    // and costs no timer. Otherwise waiting for the handover and reading the
    // rest share one bound, in case something still holds the body.
    match unread.try_recv() {
        Err(TryRecvError::Closed) => true,
        Ok(rest) => within_drain_time(read_to_end(rest)).await,
        Err(TryRecvError::Empty) => {
            within_drain_time(async move {
                match unread.await {
                    Ok(rest) => read_to_end(rest).await,
                    Err(_) => true,
                }
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    /// Whether the answer around a handler given `body`, which it reads to
    /// the end or drops unread, asks to close the connection.
    async fn closes(body: Body, handler_reads: bool) -> bool {
        let handler = tower::service_fn(move |request: Request| async move {
            if handler_reads {
                axum::body::to_bytes(request.into_body(), usize::MAX)
                    .await
                    .expect("the body");
            }
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let service = KeepConnectionUsable::layer().layer(handler);
        let Ok(response) = service.oneshot(Request::new(body)).await;
        response
            .headers()
            .get(header::CONNECTION)
            .is_some_and(|value| value == "close")
    }

    fn bytes(size: usize) -> Body {
        Body::from(vec![b'x'; size])
    }

    #[tokio::test]
    async fn a_body_left_unread_is_read_here_and_one_too_long_closes_the_connection() {
        assert!(!closes(bytes(0), false).await, "no body");
        assert!(!closes(bytes(4096), true).await, "read by the handler");
        assert!(!closes(bytes(4096), false).await, "read here");
        assert!(
            !closes(bytes(DRAIN_LIMIT), false).await,
            "read here, to the limit"
        );
        assert!(
            closes(bytes(DRAIN_LIMIT + 1), false).await,
            "too long to read"
        );
    }

    #[tokio::test]
    async fn a_body_that_stops_coming_closes_the_connection_after_the_drain_time() {
        // One byte, then nothing, as a client that stalls mid-upload: the
        // answer waits for it no longer than the drain time.
        use futures_util::StreamExt;
        let first = futures_util::stream::once(async { Ok::<_, Infallible>(Bytes::from("x")) });
        let stalled = Body::from_stream(first.chain(futures_util::stream::pending()));
        let answered = tokio::time::timeout(DRAIN_TIME * 10, closes(stalled, false)).await;
        assert_eq!(answered.ok(), Some(true), "answered, asking to close");
    }
}
