//! One concern of the `ChatService` (`proxy::service`): the chat requests the proxy refuses
//! itself, with no upstream (`ChatService::refuse`, on either connection): why, and the JSON
//! answer. The bytes of that answer, and of every other response the proxy writes itself, are
//! `runtime::respond`'s.

use pingora::Result;

use super::ctx::{ChatCtx, Served};
use super::service::ChatService;
use crate::runtime::downstream::Downstream;
use crate::runtime::respond::respond_json;

/// Why the proxy answers a chat request itself.
pub(super) enum Rejection {
    TooLarge,
    BadBody,
    /// The body did not arrive within `limits.body_timeout_ms`.
    BodyTimeout,
    /// An id that may not go into a URL (`core::ids::is_safe_id`).
    UnsafeId,
}

impl Rejection {
    /// HTTP status, `rejected_total` cause and error code.
    fn parts(&self) -> (u16, &'static str, &'static str) {
        match self {
            Rejection::TooLarge => (413, "too_large", "PAYLOAD_TOO_LARGE"),
            Rejection::BadBody => (400, "bad_body", "INVALID_REQUEST"),
            Rejection::BodyTimeout => (408, "body_timeout", "REQUEST_TIMEOUT"),
            Rejection::UnsafeId => (400, "unsafe_id", "INVALID_REQUEST"),
        }
    }
}

impl ChatService {
    /// Answer a chat request the proxy refuses itself (no upstream contacted): the probe slot is
    /// freed, the refusal counted, and the JSON error carries the routing headers.
    pub(super) async fn refuse<D: Downstream>(
        &self,
        session: &mut D,
        chat: &mut ChatCtx,
        rejection: Rejection,
        message: &str,
    ) -> Result<bool> {
        let (status, cause, code) = rejection.parts();
        // The runtime will not be tried: another probe may go now, not once this answer is out.
        chat.breaker.release();
        self.shared
            .metrics
            .rejected_total
            .with_label_values(&[cause])
            .inc();
        chat.served = Served::Refused;
        respond_json(session, status, chat.decision, &chat.cors, code, message).await?;
        Ok(true)
    }
}
