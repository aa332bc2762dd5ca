//! Settling a proxied call, whatever way it ends.
//!
//! A [`SettleGuard`] is created as soon as a request is admitted and settles
//! it exactly once: when the upstream's error answer is read, when the
//! streamed body ends, breaks or stalls, or — through `Drop` — when the
//! client goes away first. Dropping the body also drops the upstream
//! response, which cancels the upstream request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::ProxyState;
use super::estimate::{Endpoint, Estimate};
use super::scan::{Findings, Scanner};
use crate::domain::limits::WorkspaceId;
use crate::domain::price::Tier;
use crate::domain::upstream::UpstreamClass;
use crate::domain::workspace::Model;
use crate::engine::{
    CredentialCall, EngineError, Reported, TokenUsage, UpstreamAnswer, UsageReport,
};
use crate::metrics::RequestOutcome;

/// Everything needed to settle one admitted call.
pub struct Settlement {
    pub state: ProxyState,
    pub workspace: WorkspaceId,
    pub reservation: u64,
    pub model: Option<Model>,
    pub tier: Tier,
    pub endpoint: Endpoint,
    pub estimate: Estimate,
    pub arrived: Instant,
    /// The upstream credential the call is billed to, whose billing block
    /// its answer may start or lift.
    pub credential: CredentialCall,
}

/// What the metrics count of a call's report, kept while the report itself
/// goes to the engine.
#[derive(Clone, Copy)]
struct Answered {
    /// The upstream never answered in full.
    no_answer: bool,
    tokens: Option<TokenUsage>,
}

impl Answered {
    fn of(report: &UsageReport) -> Self {
        Self {
            no_answer: report
                .answer
                .as_ref()
                .is_some_and(UpstreamAnswer::is_missing),
            tokens: report.tokens,
        }
    }
}

impl Settlement {
    /// Reports the call to the engine and the metrics. `tokens: None` keeps
    /// the estimate; `answer: None` means the upstream never answered.
    /// Bodies end (and are dropped) outside async code: the engine settles
    /// at once or in a task of its own (`Engine::settle_detached`).
    fn finish(self, tokens: Option<TokenUsage>, answer: Option<UpstreamAnswer>) {
        let report = self.report(tokens, answer);
        let engine = self.state.engine.clone();
        let workspace = self.workspace.clone();
        let answered = Answered::of(&report);
        engine.settle_detached(workspace, report, move |reported| {
            self.account(reported, answered);
        });
    }

    /// Like [`finish`](Self::finish), waiting for the settlement; answers
    /// what the upstream's answer meant.
    pub async fn finish_now(
        self,
        tokens: Option<TokenUsage>,
        answer: Option<UpstreamAnswer>,
    ) -> Option<UpstreamClass> {
        let report = self.report(tokens, answer);
        let answered = Answered::of(&report);
        let reported = self.state.engine.settle(&self.workspace, report).await;
        self.account(reported, answered)
    }

    fn report(&self, tokens: Option<TokenUsage>, answer: Option<UpstreamAnswer>) -> UsageReport {
        UsageReport {
            reservation: Some(self.reservation),
            model: self.model.clone(),
            tokens,
            answer,
            latency_ms: Some(self.arrived.elapsed().as_millis() as u64),
            tier: self.tier,
            // Every call the proxy reports had a reservation, which knows
            // the scope counters it charged.
            scoped: Default::default(),
        }
    }

    fn account(
        &self,
        reported: Result<Reported, EngineError>,
        Answered { no_answer, tokens }: Answered,
    ) -> Option<UpstreamClass> {
        let metrics = &self.state.metrics;
        let class = match reported {
            Ok(reported) => {
                if reported.missing_reservation {
                    // The reservation expired while the call ran (or a reset
                    // cleared it); its estimate stays charged.
                    tracing::debug!(workspace = %self.workspace, "reservation gone before settling");
                }
                metrics.cost(&self.workspace, self.model.as_deref(), reported.cost);
                reported.class
            }
            Err(error) => {
                // The workspace was deleted while the call ran (the only way
                // a report fails): nothing is left to settle.
                tracing::debug!(workspace = %self.workspace, %error, "nothing to settle");
                None
            }
        };
        self.state
            .engine
            .observe_credential(&self.credential, class);
        let outcome = match class {
            None => RequestOutcome::Abandoned,
            Some(_) if no_answer => RequestOutcome::UpstreamFailed,
            Some(class) => RequestOutcome::Upstream(class),
        };
        metrics.request(&self.workspace, self.endpoint.label(), outcome);
        if let Some(tokens) = tokens {
            metrics.tokens(&self.workspace, self.model.as_deref(), tokens);
        }
        class
    }

    /// Prices the call at the tier its answer says it was served at, where
    /// it says one: OpenAI bills a `priority` request it served at the
    /// standard tier (past the priority ramp limit) at the standard rates,
    /// and an `auto` one at the tier it chose.
    fn served_as(&mut self, findings: &Findings) {
        if let Some(tier) = &findings.service_tier {
            self.tier = Tier::requested(tier);
        }
    }

    /// Tokens for a stream that stopped early without usage: the prompt as
    /// estimated, and the text generated so far at four bytes per token.
    fn seen_so_far(&self, findings: &Findings) -> TokenUsage {
        TokenUsage {
            prompt: self.estimate.prompt,
            completion: findings.output_bytes.div_ceil(4),
            ..TokenUsage::default()
        }
    }
}

/// Settles its call exactly once; if nothing else did, dropping it does,
/// keeping the estimate (the client left before the upstream answered).
pub struct SettleGuard(Option<Settlement>);

impl SettleGuard {
    pub fn new(settlement: Settlement) -> Self {
        Self(Some(settlement))
    }

    /// Settles now, waiting for the settlement; answers what the upstream's
    /// answer meant.
    pub async fn settle(
        &mut self,
        tokens: Option<TokenUsage>,
        answer: Option<UpstreamAnswer>,
    ) -> Option<UpstreamClass> {
        let settlement = self.0.take()?;
        // The client may leave while the settlement waits for the store; it
        // goes on, with its metrics.
        let engine = settlement.state.engine.clone();
        engine
            .to_the_end(settlement.finish_now(tokens, answer))
            .await
    }

    /// Hands the settlement over to a body stream, which settles it from now on.
    pub fn into_settlement(mut self) -> Option<Settlement> {
        self.0.take()
    }
}

impl Drop for SettleGuard {
    fn drop(&mut self) {
        if let Some(settlement) = self.0.take() {
            settlement.finish(None, None);
        }
    }
}

/// A response body on its way from the upstream to the client: scanned for
/// usage, cut when the upstream stalls, and settled when it ends.
pub struct MeteredBody {
    upstream: Incoming,
    scanner: Scanner,
    settlement: Option<Settlement>,
    answer: UpstreamAnswer,
    idle: Duration,
    /// When the upstream last sent data (or the body began).
    last_data: tokio::time::Instant,
    /// Fires no earlier than `idle` after `last_data`. It is moved only when
    /// it fires, not at every chunk: moving a timer takes the runtime's
    /// timer lock, and an answer that arrives in one piece never needs it
    /// armed at all.
    deadline: Pin<Box<Sleep>>,
}

impl MeteredBody {
    pub fn new(
        upstream: Incoming,
        scanner: Scanner,
        settlement: Option<Settlement>,
        answer: UpstreamAnswer,
        idle: Duration,
    ) -> Self {
        Self {
            upstream,
            scanner,
            settlement,
            answer,
            idle,
            last_data: tokio::time::Instant::now(),
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// The body ended as the upstream meant it to.
    fn complete(&mut self) -> Bytes {
        let (rest, findings) = self.scanner.finish();
        if let Some(mut settlement) = self.settlement.take() {
            settlement.served_as(&findings);
            let mut answer = std::mem::take(&mut self.answer);
            if let Some(error) = findings.error {
                // An error event inside a 200 stream: the SDKs raise it; it
                // counts as the server error it is.
                answer.status = 500;
                answer.error_type = error.error_type;
                answer.error_code = error.code;
                answer.error_message = error.message;
            }
            let tokens = findings.usage.as_ref().map(|usage| usage.tokens());
            settlement.finish(tokens, Some(answer));
        }
        rest
    }

    /// The upstream broke off or stalled: settled with the estimate, and
    /// counted as a server error.
    fn broken(&mut self, reason: &str) {
        if let Some(settlement) = self.settlement.take() {
            tracing::warn!(workspace = %settlement.workspace, reason, "upstream stream broke off");
            let answer =
                UpstreamAnswer::missing("upstream_stream_broken", reason, self.answer.headers);
            settlement.finish(None, Some(answer));
        }
    }
}

impl Stream for MeteredBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.settlement.is_none() {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers carry no data and nothing the scanner reads.
                    let Ok(chunk) = frame.into_data() else {
                        continue;
                    };
                    this.last_data = tokio::time::Instant::now();
                    match this.scanner.feed(chunk) {
                        Ok(out) if out.is_empty() => {}
                        Ok(out) => return Poll::Ready(Some(Ok(out))),
                        Err(too_long) => {
                            let reason = too_long.to_string();
                            this.broken(&reason);
                            return Poll::Ready(Some(Err(std::io::Error::other(reason))));
                        }
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    this.broken(&format!(
                        "error decoding response body: {}",
                        super::upstream::with_causes(&error)
                    ));
                    return Poll::Ready(Some(Err(std::io::Error::other(error))));
                }
                Poll::Ready(None) => {
                    let rest = this.complete();
                    return Poll::Ready((!rest.is_empty()).then_some(Ok(rest)));
                }
                Poll::Pending => {
                    // Fired, but data came since it was set: it moves to
                    // `idle` after that data, and is polled again to wake
                    // this task then.
                    while this.deadline.as_mut().poll(cx).is_ready() {
                        let due = this.last_data + this.idle;
                        if due > tokio::time::Instant::now() {
                            this.deadline.as_mut().reset(due);
                            continue;
                        }
                        let reason = format!("no data from the upstream for {:?}", this.idle);
                        this.broken(&reason);
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            reason,
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for MeteredBody {
    /// The body was dropped before it ended: either the client went away,
    /// or the server stopped polling because the client had every byte a
    /// `content-length` announced. Either way the upstream answered fine, so
    /// the call settles as a success, with its usage if that arrived.
    /// Without usage:
    /// - a stream of a reasoning model keeps its whole estimate: the model
    ///   may have spent its whole allowance on hidden reasoning, which
    ///   OpenAI bills and no text shows;
    /// - another stream is charged for the text seen so far (the upstream
    ///   stops generating when it is cancelled);
    /// - a JSON answer keeps the estimate, since the upstream generated all
    ///   of it.
    fn drop(&mut self) {
        if let Some(mut settlement) = self.settlement.take() {
            let (_, findings) = self.scanner.finish();
            settlement.served_as(&findings);
            let reasoning = settlement
                .model
                .as_deref()
                .is_some_and(crate::openai::is_reasoning_model);
            let tokens = match &findings.usage {
                Some(usage) => Some(usage.tokens()),
                None if self.scanner.is_stream() && !reasoning => {
                    Some(settlement.seen_so_far(&findings))
                }
                None => None,
            };
            let answer = std::mem::take(&mut self.answer);
            settlement.finish(tokens, Some(answer));
        }
    }
}
