//! A slow client is not a slow runtime: the execution deadline starts once the chat body has been
//! read, and a body that takes longer than `limits.body_timeout_ms` is answered 408 without the
//! runtime or the breaker ever hearing of it.

use crate::support;

use std::time::{Duration, Instant};

use cutover_proxy::core::breaker::State;
use support::*;

/// The head of a chat request as org-a, announcing `HI` as its body, which is not sent.
fn head_only(session: &str) -> Vec<u8> {
    chat_head("HTTP/1.1", session, HI.len(), "")
}

fn runtime_executions(h: &Running) -> u64 {
    h.runtime_window().total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_the_execution_timeout_is_still_served_by_the_runtime() {
    let h = Harness::new()
        .config(|cfg| {
            cfg.runtime.execution_timeout_ms = 300;
            cfg.limits.body_timeout_ms = 5_000;
        })
        .start()
        .await;

    let mut c = Client::connect(h.proxy_addr).await;
    c.send_raw(&head_only("s-slow")).await;
    // Longer than the whole execution may take: before, the runtime was asked with a deadline
    // already past and the client got TIMEOUT.
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.send_raw(HI.as_bytes()).await;
    let r = c.read_response().await;

    assert_served(&r, RT, "allowlist");
    assert_eq!(event_names(&r), ["message", "done"], "{}", r.text());
    assert_eq!(h.runtime.work().len(), 1);
    assert_eq!(h.runtime.work()[0].json()["user_message"], "hi");
    assert_one_runtime(&h, 0, "success").await;
    assert_eq!(
        metric(&h, "chat_execution_timeout_total", &[("mode", RT)]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_its_own_bound_is_408_and_charged_to_nobody() {
    let h = Harness::new()
        .config(|cfg| {
            cfg.limits.body_timeout_ms = 200;
            // One failure would open the breaker if it were charged.
            cfg.breaker.min_requests = 1;
        })
        .start()
        .await;

    let mut c = Client::connect(h.proxy_addr).await;
    c.send_raw(&head_only("s-stalled")).await;
    let started = Instant::now();
    let r = c.read_response().await;
    let waited = started.elapsed();

    assert_eq!(r.status, 408, "{}", r.text());
    assert_eq!(mode_reason(&r), (Some(RT), Some("allowlist")));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["success"], false);
    assert_eq!(r.json()["error"]["code"], "REQUEST_TIMEOUT");
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(c.closed_within(Duration::from_secs(2)).await);
    assert_eq!(
        metric(
            &h,
            "chat_requests_rejected_total",
            &[("cause", "body_timeout")]
        ),
        1.0
    );

    // Another stalled client: with one sample enough to judge, a charged refusal would open it.
    let mut again = Client::connect(h.proxy_addr).await;
    again.send_raw(&head_only("s-again")).await;
    assert_eq!(again.read_response().await.status, 408);

    assert!(h.runtime.work().is_empty(), "{:?}", h.runtime.work());
    assert!(h.legacy.work().is_empty());
    assert_eq!(runtime_executions(&h), 0);
    assert_eq!(h.shared.breaker.state(), State::Closed);

    // The breaker still lets the next, prompt chat through to the runtime.
    let r = h.chat("org-a").send().await;
    assert_served(&r, RT, "allowlist");
}
