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

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot::{self, error::TryRecvError};

/// The most of an unread body that is read to keep its connection.
const DRAIN_LIMIT: usize = 1 << 20;
/// The longest the answer waits for that.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// A request body that, when dropped before its end, hands what is left to
/// [`keep_connection_usable`].
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

/// Middleware: see the module's documentation.
pub async fn keep_connection_usable(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let (leftover, mut unread) = oneshot::channel();
    let tracked = Body::new(Tracked {
        inner: body,
        leftover: Some(leftover),
    });
    let mut response = next.run(Request::from_parts(parts, tracked)).await;
    // The body is handed over when the handler drops it unread; a body read
    // to its end is not (the channel closes empty), which is the usual case
    // and costs no timer. Otherwise waiting for the handover and reading the
    // rest share one bound, in case something still holds the body.
    let drained = match unread.try_recv() {
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
    };
    if !drained {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
