//! What the failover before the commit (`commit_point`) and the rescue inside the open stream
//! (`rescue`) share: the same failures, answered two ways, must leave the same traces.

use std::time::Duration;

use cutover_proxy::app::LocalServer;
use cutover_proxy::core::breaker::State;
use tokio::task::JoinHandle;

use super::client::Response;
use super::{
    assert_served, done_frame, event_data, eventually, execution_error, frame, metric, recorded,
    text, Harness, Running, Step, DIRECT, RT,
};

impl Running {
    /// The runtime was asked once, then legacy once, on the client's path with its `body` byte
    /// for byte.
    #[track_caller]
    pub fn assert_legacy_got_the_chat(&self, body: &str, what: &str) {
        assert_eq!(self.runtime.work().len(), 1, "{what}");
        let legacy = self.legacy.work();
        assert_eq!(legacy.len(), 1, "{what}");
        assert_eq!(legacy[0].body, body.as_bytes(), "{what}: legacy's body");
        assert_eq!(legacy[0].path, "/api/v1/chat/sessions/s-1", "{what}");
    }

    /// Sends the shutdown cutoff while `chat` is under way: it ends within 3 s, served by the
    /// runtime, whole, its last event a `SHUTTING_DOWN` error.
    pub async fn cut_off(&self, chat: JoinHandle<Response>, what: &str) -> Response {
        self.shared.cutoff.send_replace(true);
        let r = tokio::time::timeout(Duration::from_secs(3), chat)
            .await
            .unwrap_or_else(|_| panic!("{what} was not ended by the cutoff"))
            .unwrap();
        assert_served(&r, RT, "allowlist");
        let events = r.events();
        let last = events.last().expect("events");
        assert_eq!(last.0, "error", "{what}: {events:?}");
        assert_eq!(event_data(last)["code"], "SHUTTING_DOWN", "{what}");
        r
    }
}

/// In front of a runtime that fails every chat before content, with a breaker that opens at an
/// error rate of 0.5 over two requests: two chats, each answered as `answered` checks, are two
/// errors that open it, and the third goes to legacy without reaching the runtime.
pub async fn assert_two_failures_open_the_breaker(
    harness: Harness,
    answered: impl Fn(&Response, &str),
) {
    let h = harness
        .config(|c| {
            c.breaker.min_requests = 2;
            c.breaker.error_rate = 0.5;
        })
        .start()
        .await;
    for i in 1..=2 {
        let r = h.chat("org-a").session(&format!("s-{i}")).send().await;
        answered(&r, &format!("request {i}"));
        recorded(&h, i, i).await;
    }
    assert_eq!(h.shared.breaker.state(), State::Open);
    let (_, window) = h.admin("GET", "/runtime/metrics").await;
    assert_eq!(window["data"]["runtime"]["error"], 2);
    let r = h.chat("org-a").session("s-3").send().await;
    assert_served(&r, DIRECT, "breaker_open");
    assert_eq!(h.runtime.work().len(), 2);
}

/// A client that left is recorded (within 3 s) as a cancelled execution of `mode`, with the
/// runtime's errors at `runtime_errors`.
pub async fn assert_departure_recorded(server: &LocalServer, mode: &str, runtime_errors: f64) {
    let cancelled = || metric(server, "chat_execution_cancelled_total", &[("mode", mode)]);
    assert!(
        eventually(Duration::from_secs(3), || cancelled() == 1.0).await,
        "the departure was never recorded"
    );
    let errors = metric(server, "chat_execution_error_total", &[("mode", RT)]);
    assert_eq!(errors, runtime_errors);
}

/// A runtime's `thinking` event, at the planning stage.
pub fn planning() -> Vec<u8> {
    frame(
        "thinking",
        serde_json::json!({"content": "planning", "stage": "planning"}),
    )
}

/// Ways a runtime fails after thinking and before any content, each named: an
/// `execution_error`, a crash, a frame over a `runtime.max_frame_bytes` of 1024, and a clean
/// end.
pub fn failures_after_thinking() -> Vec<(&'static str, Vec<Step>)> {
    let big = "x".repeat(4096);
    [
        (
            "execution_error after thinking",
            vec![
                Step::Send(execution_error("LLM_ERROR")),
                Step::Send(done_frame()),
            ],
        ),
        ("a crash after thinking", vec![Step::Close]),
        (
            "a frame over max_frame_bytes before content",
            vec![Step::Send(text(&big)), Step::Hang],
        ),
        (
            "a stream that ends without content",
            vec![Step::Send(done_frame())],
        ),
    ]
    .into_iter()
    .map(|(what, after)| {
        let mut steps = vec![Step::Send(planning())];
        steps.extend(after);
        (what, steps)
    })
    .collect()
}
