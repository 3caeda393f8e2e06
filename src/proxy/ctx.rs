//! What one request carries between Pingora's callbacks: the config it started with and, for a
//! chat request, who asked, how it was routed and what served it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::cors::CorsHeaders;
use crate::core::identity::Caller;
use crate::core::routing::{ChatRoute, RolloutDecision};
use crate::core::scorecard::DecodingObserver;
use crate::core::stats::Outcome;
use crate::runtime::connection::OpenFailure;
use crate::runtime::relay::StreamReport;
use crate::runtime::shadow::Pair;
use crate::state::in_flight::{InFlight, RequestGuard};
use crate::state::{Active, Shared};

/// Everything one request carries between callbacks.
pub struct RequestCtx {
    pub(super) started: Instant,
    /// Counts the request as in flight until Pingora drops the context, for the shutdown drain.
    pub(super) _guard: RequestGuard,
    /// The config the request started with; a reload mid-request does not change it.
    pub(super) active: Arc<Active>,
    pub(super) chat: Option<ChatCtx>,
}

/// A chat the front door read and routed itself, handed to Pingora for legacy to serve.
pub(super) struct Handover {
    pub ctx: RequestCtx,
    pub route: ChatRoute,
    /// Routed to legacy (not sent there by the runtime path): a shadow copy may run.
    pub shadow: bool,
}

/// A chat request's state.
pub(super) struct ChatCtx {
    pub caller: Option<Caller>,
    pub decision: RolloutDecision,
    /// Where the runtime's outcome goes, holding a probe slot if this chat was admitted as one.
    pub breaker: BreakerTicket,
    pub served: Served,
    /// Legacy response: time to first body byte and bytes sent.
    pub first_byte: Option<Duration>,
    pub bytes: u64,
    /// Request body bytes passed on to legacy, held to `limits.max_chat_body_bytes` for bodies
    /// without a Content-Length (which cannot be refused up front).
    pub body_to_legacy: usize,
    pub in_flight: Option<InFlight>,
    /// When the runtime was asked, once the chat body had been read: its latency starts here.
    pub asked: Option<Instant>,
    /// A shadow copy of this legacy chat is running: the legacy answer is measured as it
    /// passes, to be compared with it. Boxed: few chats have one, and every request's context
    /// is moved whole into Pingora's future for it, twice.
    pub shadow: Option<Box<LegacyHalf>>,
    /// The client's `x-request-id`, or the one made for its runtime execution, for the access
    /// log: what joins its line to the client's and upstreams' own logs.
    pub request_id: Option<String>,
    /// The CORS headers of any response the proxy makes itself for this chat.
    pub cors: CorsHeaders,
}

/// The legacy half of a shadowed request.
pub(super) struct LegacyHalf {
    pub pair: Pair,
    /// Legacy's answer, decoded per its `Content-Encoding` once its head is known.
    pub observer: DecodingObserver,
    /// Its content coding is one the observer cannot read: nothing to compare.
    pub unreadable: bool,
}

/// What serves a chat request.
pub(super) enum Served {
    /// The runtime was chosen and nothing answered: reading the request failed first.
    Unanswered,
    /// The proxy refused it itself (4xx) without any upstream.
    Refused,
    /// The proxy answered it with a runtime stream (or an error event in its place).
    Runtime(StreamReport),
    /// Proxied to legacy, as decided or because the runtime failed before its first byte.
    Legacy { failover: Option<Failover> },
    /// The runtime failed before content with the client's stream open
    /// (`runtime.pre_content = "stream"`), and the proxy relayed legacy's answer into it:
    /// counted as a failover, `report` (legacy's part) saying how the stream ended.
    Rescued {
        failover: Failover,
        report: StreamReport,
    },
}

/// The runtime failed before its first byte and legacy served the request instead.
pub(super) struct Failover {
    pub failure: OpenFailure,
    /// How long the runtime took to fail.
    pub after: Duration,
}

impl ChatCtx {
    pub fn new(caller: Option<Caller>, decision: RolloutDecision, breaker: BreakerTicket) -> Self {
        let served = match decision.mode {
            crate::core::config::Mode::DirectLlm => Served::Legacy { failover: None },
            crate::core::config::Mode::RuntimeOrchestrator => Served::Unanswered,
        };
        ChatCtx {
            caller,
            decision,
            breaker,
            served,
            first_byte: None,
            bytes: 0,
            body_to_legacy: 0,
            in_flight: None,
            asked: None,
            shadow: None,
            request_id: None,
            cors: CorsHeaders::default(),
        }
    }

    /// How long the runtime has had the request: since it was asked, else since `started`.
    pub fn runtime_time(&self, started: Instant) -> Duration {
        self.asked.unwrap_or(started).elapsed()
    }

    pub fn org(&self) -> Option<&str> {
        self.caller.as_ref().map(|c| c.org_id.as_str())
    }

    /// What reached the client, for the access log.
    pub fn delivered(&self) -> Delivered<'_> {
        let legacy = Delivered {
            events: 0,
            bytes: self.bytes,
            first_write: self.first_byte,
            error_code: None,
            detail: None,
        };
        match &self.served {
            Served::Runtime(r) => Delivered {
                events: r.events,
                bytes: r.bytes,
                first_write: r.first_write,
                error_code: r.error_code,
                detail: r.detail.as_deref(),
            },
            Served::Legacy {
                failover: Some(failover),
            } => Delivered {
                detail: Some(failover.failure.detail.as_str()),
                ..legacy
            },
            Served::Rescued { failover, report } => Delivered {
                events: report.events,
                bytes: report.bytes,
                first_write: report.first_write,
                error_code: report.error_code,
                detail: Some(report.detail.as_deref().unwrap_or(&failover.failure.detail)),
            },
            Served::Legacy { failover: None } | Served::Refused | Served::Unanswered => legacy,
        }
    }
}

/// What reached the client of a chat request.
pub(super) struct Delivered<'a> {
    pub events: u64,
    pub bytes: u64,
    pub first_write: Option<Duration>,
    pub error_code: Option<&'static str>,
    pub detail: Option<&'a str>,
}

/// What a chat owes the breaker. Every runtime outcome is counted on the breaker through it,
/// probe or not; if a half-open breaker admitted the chat as a probe, it also holds that slot,
/// settled by the outcome or freed when the ticket is released or dropped, so no path out of a
/// request can leak one.
#[derive(Default)]
pub(super) struct BreakerTicket(Option<Arc<Shared>>);

impl BreakerTicket {
    pub fn new(shared: &Arc<Shared>, probe: bool) -> Self {
        BreakerTicket(probe.then(|| shared.clone()))
    }

    /// Count the runtime's outcome on the breaker; a probe's slot is settled by it.
    pub fn record(&mut self, shared: &Shared, outcome: Outcome, latency: Duration) {
        let probe = self.0.take().is_some();
        shared.breaker.record(outcome, latency, probe);
    }

    /// The runtime will not be asked after all: a probe's slot goes to another request now.
    pub fn release(&mut self) {
        *self = BreakerTicket::default();
    }
}

impl Drop for BreakerTicket {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.breaker.release_probe();
        }
    }
}
