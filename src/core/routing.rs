//! The mode decision: which upstream serves a chat request, and why.
//!
//! Pure: it takes the caller, the rollout settings and the breaker's state, and returns a
//! `RolloutDecision`. Request classification (which paths are chat routes) lives here too.

use std::collections::HashSet;

use crate::core::breaker::{Admission, State};
use crate::core::config::{Mode, RolloutConfig};
use crate::core::identity::Unverified;

/// Why a request got its mode; sent as `x-execution-reason` and used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    BreakerOpen,
    Denylist,
    Allowlist,
    Percent,
    Default,
    NoIdentity,
    /// The runtime was chosen but refused or failed before the first byte; legacy served it.
    Failover,
    /// The runtime was chosen but the body is larger than can be replayed on failover.
    LargeBody,
    /// The trusted ingress header and a verified token name different orgs.
    IdentityConflict,
    /// The runtime was chosen but legacy refused the conversation bridge's lookup (401, 403,
    /// 404, any 4xx): legacy answers the chat itself, as it would have.
    BridgeRefused,
    /// The runtime was chosen but the bridge's lookup failed (connect error, 5xx, timeout).
    BridgeUnavailable,
    /// The runtime was chosen, the bridge is off and neither the body nor the config names an
    /// agent, which the runtime requires.
    NoAgent,
    /// A half-open breaker let this request through to the runtime as one of its probes: the
    /// breaker's test, whatever the rollout's reason was.
    Probe,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BreakerOpen => "breaker_open",
            Reason::Denylist => "denylist",
            Reason::Allowlist => "allowlist",
            Reason::Percent => "percent",
            Reason::Default => "default",
            Reason::NoIdentity => "no_identity",
            Reason::Failover => "failover",
            Reason::LargeBody => "large_body",
            Reason::IdentityConflict => "identity_conflict",
            Reason::BridgeRefused => "bridge_refused",
            Reason::BridgeUnavailable => "bridge_unavailable",
            Reason::NoAgent => "no_agent",
            Reason::Probe => "probe",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutDecision {
    pub mode: Mode,
    pub reason: Reason,
}

impl RolloutDecision {
    fn direct(reason: Reason) -> Self {
        RolloutDecision {
            mode: Mode::DirectLlm,
            reason,
        }
    }
    fn runtime(reason: Reason) -> Self {
        RolloutDecision {
            mode: Mode::RuntimeOrchestrator,
            reason,
        }
    }
}

/// Rollout settings compiled for fast lookups.
#[derive(Debug, Clone)]
pub struct Rollout {
    default_mode: Mode,
    runtime_orgs: HashSet<String>,
    direct_orgs: HashSet<String>,
    /// Orgs whose bucket is below this (out of 10 000) go to the runtime.
    percent_basis_points: u64,
}

impl Rollout {
    pub fn new(config: &RolloutConfig) -> Rollout {
        Rollout {
            default_mode: config.default_mode,
            runtime_orgs: config.runtime_orgs.iter().cloned().collect(),
            direct_orgs: config.direct_orgs.iter().cloned().collect(),
            percent_basis_points: (config.runtime_percent * 100.0).round() as u64,
        }
    }

    /// Decide the mode for a caller. `org` is `None` when the caller could not be verified. The
    /// breaker has its say afterwards, in [`gate`].
    pub fn decide(&self, org: Option<&str>) -> RolloutDecision {
        let Some(org) = org else {
            return RolloutDecision::direct(Reason::NoIdentity);
        };
        if self.direct_orgs.contains(org) {
            return RolloutDecision::direct(Reason::Denylist);
        }
        if self.runtime_orgs.contains(org) {
            return RolloutDecision::runtime(Reason::Allowlist);
        }
        if self.percent_basis_points > 0 && org_bucket(org) < self.percent_basis_points {
            return RolloutDecision::runtime(Reason::Percent);
        }
        match self.default_mode {
            Mode::DirectLlm => RolloutDecision::direct(Reason::Default),
            Mode::RuntimeOrchestrator => RolloutDecision::runtime(Reason::Default),
        }
    }

    /// Decide the mode for what identification gave: a verified caller's org, or why there is none.
    pub fn decide_identified(&self, org: Result<&str, Unverified>) -> RolloutDecision {
        match org {
            Ok(org) => self.decide(Some(org)),
            Err(Unverified::Conflict) => RolloutDecision::direct(Reason::IdentityConflict),
            Err(_) => self.decide(None),
        }
    }

    /// Whether an org is named in the config (allow- or denylist): only those may label metrics.
    pub fn names(&self, org: &str) -> bool {
        self.runtime_orgs.contains(org) || self.direct_orgs.contains(org)
    }
}

/// A chat request's mode once the breaker had its say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gated {
    pub decision: RolloutDecision,
    /// Admitted by a half-open breaker as a probe: its outcome (or release) settles the slot.
    pub probe: bool,
}

/// The mode gate: the rollout's choice, then the breaker's. Only a request the rollout sends to
/// the runtime asks the breaker for admission (`admit` is called then and only then, since asking
/// a half-open breaker takes a probe slot); one it admits as a probe is labelled `probe`, one sent
/// to legacy while the breaker is not closed `breaker_open`, whatever sent it there, so the reason
/// says what the breaker did.
pub fn gate(decision: RolloutDecision, breaker: State, admit: impl FnOnce() -> Admission) -> Gated {
    let go = |decision, probe| Gated { decision, probe };
    match decision.mode {
        Mode::RuntimeOrchestrator => match admit() {
            Admission::Allowed => go(decision, false),
            Admission::Probe => go(RolloutDecision::runtime(Reason::Probe), true),
            Admission::Rejected => go(RolloutDecision::direct(Reason::BreakerOpen), false),
        },
        Mode::DirectLlm if breaker != State::Closed => {
            go(RolloutDecision::direct(Reason::BreakerOpen), false)
        }
        Mode::DirectLlm => go(decision, false),
    }
}

/// A stable bucket in 0..10 000 for an org: the same on every replica and across restarts, so an
/// org never flaps between modes while `runtime_percent` is unchanged, and raising the percentage
/// only ever adds orgs.
pub fn org_bucket(org: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(org.as_bytes()) % 10_000
}

/// Whether a request should be mirrored to the runtime, for `shadow_percent` in 0..=100.
/// `draw` is a uniform random number in 0..10 000.
pub fn shadow_selected(shadow_percent: f64, draw: u64) -> bool {
    draw < (shadow_percent * 100.0).round() as u64
}

/// A chat route and the session it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatRoute {
    /// `POST /api/v1/chat/sessions/{sessionId}`
    Session(String),
    /// `POST /api/v1/chat/start`
    Start,
}

impl ChatRoute {
    pub fn session_id(&self) -> Option<&str> {
        match self {
            ChatRoute::Session(id) => Some(id),
            ChatRoute::Start => None,
        }
    }
}

/// Classify a request: `Some` for the two chat routes, `None` for everything else (which goes to
/// legacy untouched). The query string is ignored.
///
/// The session id is the path segment percent-decoded, as the legacy API's router hands it to its
/// handler, so both upstreams see the same id. A segment with a malformed escape, or one that
/// decodes to something that is not printable UTF-8, is not taken for a chat route.
pub fn chat_route(method: &http::Method, path: &str) -> Option<ChatRoute> {
    if method != http::Method::POST {
        return None;
    }
    let path = path.split('?').next().unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path == "/api/v1/chat/start" {
        return Some(ChatRoute::Start);
    }
    let id = path.strip_prefix("/api/v1/chat/sessions/")?;
    let valid = !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%'));
    if !valid {
        return None;
    }
    percent_decode(id).map(ChatRoute::Session)
}

/// Decode `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8 without
/// control characters.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).ok()?;
    let printable = !decoded.trim().is_empty() && !decoded.chars().any(char::is_control);
    printable.then_some(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rollout(f: impl FnOnce(&mut RolloutConfig)) -> Rollout {
        let mut c = RolloutConfig::default();
        f(&mut c);
        Rollout::new(&c)
    }

    fn gated(decision: RolloutDecision, breaker: State, admission: Admission) -> (Gated, bool) {
        let mut asked = false;
        let g = gate(decision, breaker, || {
            asked = true;
            admission
        });
        (g, asked)
    }

    #[test]
    fn the_gate_asks_the_breaker_only_for_the_runtime() {
        let to_runtime = RolloutDecision::runtime(Reason::Allowlist);
        let ok = |decision, probe| Gated { decision, probe };
        assert_eq!(
            gated(to_runtime, State::Closed, Admission::Allowed),
            (ok(to_runtime, false), true)
        );
        assert_eq!(
            gated(to_runtime, State::HalfOpen, Admission::Probe),
            (ok(RolloutDecision::runtime(Reason::Probe), true), true)
        );
        assert_eq!(Reason::Probe.as_str(), "probe");
        assert_eq!(
            gated(to_runtime, State::Open, Admission::Rejected),
            (
                ok(RolloutDecision::direct(Reason::BreakerOpen), false),
                true
            )
        );
    }

    #[test]
    fn the_gate_labels_legacy_traffic_breaker_open_unless_closed() {
        let to_legacy = RolloutDecision::direct(Reason::Denylist);
        let ok = |decision| Gated {
            decision,
            probe: false,
        };
        assert_eq!(
            gated(to_legacy, State::Closed, Admission::Rejected),
            (ok(to_legacy), false)
        );
        for state in [State::Open, State::HalfOpen] {
            assert_eq!(
                gated(to_legacy, state, Admission::Probe),
                (ok(RolloutDecision::direct(Reason::BreakerOpen)), false),
                "{state:?}"
            );
        }
    }

    #[test]
    fn each_rule_decides_for_the_orgs_it_names() {
        /// What the case is, the config, the caller's org and the decision.
        type Case = (
            &'static str,
            fn(&mut RolloutConfig),
            Option<&'static str>,
            RolloutDecision,
        );
        let cases: [Case; 5] = [
            (
                "an allowlisted org goes to the runtime",
                |c| c.runtime_orgs = vec!["org-a".into()],
                Some("org-a"),
                RolloutDecision::runtime(Reason::Allowlist),
            ),
            (
                "an org not on the allowlist gets the default",
                |c| c.runtime_orgs = vec!["org-a".into()],
                Some("org-b"),
                RolloutDecision::direct(Reason::Default),
            ),
            (
                "the default mode applies to other orgs",
                |c| c.default_mode = Mode::RuntimeOrchestrator,
                Some("anyone"),
                RolloutDecision::runtime(Reason::Default),
            ),
            (
                "the denylist wins over the allowlist, the percent and the default",
                |c| {
                    c.default_mode = Mode::RuntimeOrchestrator;
                    c.runtime_orgs = vec!["org-x".into()];
                    c.direct_orgs = vec!["org-x".into()];
                    c.runtime_percent = 100.0;
                },
                Some("org-x"),
                RolloutDecision::direct(Reason::Denylist),
            ),
            (
                "an unverified caller never reaches the runtime",
                |c| {
                    c.default_mode = Mode::RuntimeOrchestrator;
                    c.runtime_percent = 100.0;
                },
                None,
                RolloutDecision::direct(Reason::NoIdentity),
            ),
        ];
        for (case, config, org, decision) in cases {
            assert_eq!(rollout(config).decide(org), decision, "{case}");
        }
    }

    #[test]
    fn breaker_open_wins_over_allowlist_and_default() {
        let r = rollout(|c| {
            c.runtime_orgs = vec!["org-a".into()];
            c.default_mode = Mode::RuntimeOrchestrator;
        });
        for org in [Some("org-a"), Some("org-b"), None] {
            let (g, _) = gated(r.decide(org), State::Open, Admission::Rejected);
            assert_eq!(
                g.decision,
                RolloutDecision::direct(Reason::BreakerOpen),
                "{org:?}"
            );
        }
    }

    #[test]
    fn conflicting_identities_go_to_legacy_saying_so() {
        let r = rollout(|c| {
            c.runtime_orgs = vec!["org-a".into(), "org-b".into()];
            c.default_mode = Mode::RuntimeOrchestrator;
        });
        assert_eq!(
            r.decide_identified(Err(Unverified::Conflict)),
            RolloutDecision::direct(Reason::IdentityConflict)
        );
        assert_eq!(
            r.decide_identified(Err(Unverified::Expired)),
            RolloutDecision::direct(Reason::NoIdentity)
        );
        assert_eq!(
            r.decide_identified(Ok("org-a")),
            RolloutDecision::runtime(Reason::Allowlist)
        );
        assert_eq!(Reason::IdentityConflict.as_str(), "identity_conflict");
    }

    #[test]
    fn percent_share_is_close_to_configured_over_10k_orgs() {
        for percent in [5.0, 25.0, 50.0] {
            let r = rollout(|c| c.runtime_percent = percent);
            let moved = (0..10_000)
                .filter(|i| r.decide(Some(&format!("org-{i}"))).mode == Mode::RuntimeOrchestrator)
                .count() as f64;
            let share = moved / 100.0;
            assert!(
                (share - percent).abs() < 1.5,
                "{percent}% configured, {share}% moved"
            );
        }
    }

    #[test]
    fn percent_zero_and_hundred_are_exact() {
        let none = rollout(|c| c.runtime_percent = 0.0);
        let all = rollout(|c| c.runtime_percent = 100.0);
        for i in 0..1000 {
            let org = format!("o{i}");
            assert_eq!(none.decide(Some(&org)).mode, Mode::DirectLlm);
            assert_eq!(
                all.decide(Some(&org)),
                RolloutDecision::runtime(Reason::Percent)
            );
        }
    }

    #[test]
    fn org_bucket_is_stable() {
        // Pinned so a dependency upgrade cannot silently reshuffle which orgs are moved.
        assert_eq!(org_bucket("org-a"), org_bucket("org-a"));
        assert_eq!(
            org_bucket("org-a"),
            xxhash_rust::xxh3::xxh3_64(b"org-a") % 10_000
        );
    }

    proptest! {
        #[test]
        fn raising_the_percentage_only_adds_orgs(org in "[a-z0-9-]{1,20}", low in 0.0f64..100.0, extra in 0.0f64..50.0) {
            let high = (low + extra).min(100.0);
            let a = rollout(|c| c.runtime_percent = low);
            let b = rollout(|c| c.runtime_percent = high);
            if a.decide(Some(&org)).mode == Mode::RuntimeOrchestrator {
                prop_assert_eq!(b.decide(Some(&org)).mode, Mode::RuntimeOrchestrator);
            }
        }
    }

    #[test]
    fn shadow_selection_matches_share() {
        assert!(!shadow_selected(0.0, 0));
        assert!(shadow_selected(100.0, 9_999));
        assert!(shadow_selected(10.0, 999));
        assert!(!shadow_selected(10.0, 1000));
    }

    #[test]
    fn chat_routes_are_recognised() {
        let post = http::Method::POST;
        assert_eq!(
            chat_route(&post, "/api/v1/chat/sessions/abc-123"),
            Some(ChatRoute::Session("abc-123".into()))
        );
        assert_eq!(
            chat_route(&post, "/api/v1/chat/start"),
            Some(ChatRoute::Start)
        );
        assert_eq!(
            chat_route(&post, "/api/v1/chat/start?x=1"),
            Some(ChatRoute::Start)
        );
        assert_eq!(chat_route(&http::Method::GET, "/api/v1/chat/start"), None);
        assert_eq!(chat_route(&post, "/api/v1/chat/sessions/"), None);
        assert_eq!(chat_route(&post, "/api/v1/chat/sessions/a/b"), None);
        assert_eq!(chat_route(&post, "/api/v1/chat/sessions"), None);
        assert_eq!(chat_route(&post, "/api/v1/agents"), None);
    }

    #[test]
    fn chat_route_edge_cases() {
        let post = http::Method::POST;
        let session = |id: &str| Some(ChatRoute::Session(id.into()));
        // One trailing slash is the same route; the query never matters.
        assert_eq!(
            chat_route(&post, "/api/v1/chat/sessions/s1/"),
            session("s1")
        );
        assert_eq!(
            chat_route(&post, "/api/v1/chat/start/"),
            Some(ChatRoute::Start)
        );
        assert_eq!(
            chat_route(&post, "/api/v1/chat/sessions/s1?a=/b"),
            session("s1")
        );
        // Look-alikes are not chat routes.
        for path in [
            "/api/v1/chat/start//",
            "/api/v1/chat/starts",
            "/api/v1/chat//start",
            "/api/v1/chat/sessions//",
            "/api/v1/chat/sessions/s1//",
            "/api/v1/chat/sessions/s1/messages",
            "/api/v2/chat/start",
            "/prefix/api/v1/chat/start",
            "api/v1/chat/start",
            "/api/v1/chat/sessions/../start",
            "/api/v1/chat/sessions/a b",
            "/api/v1/chat/sessions/a:b",
        ] {
            assert_eq!(chat_route(&post, path), None, "{path}");
        }
        // Every other method, even on chat paths.
        for m in ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"] {
            let m = http::Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(chat_route(&m, "/api/v1/chat/start"), None);
            assert_eq!(chat_route(&m, "/api/v1/chat/sessions/s1"), None);
        }
        // Session ids up to 256 bytes; longer ones go to legacy as they are.
        let id = "a".repeat(256);
        assert_eq!(
            chat_route(&post, &format!("/api/v1/chat/sessions/{id}")),
            session(&id)
        );
        let too_long = format!("/api/v1/chat/sessions/{}", "a".repeat(257));
        assert_eq!(chat_route(&post, &too_long), None);
        // Ids are the decoded segment, as legacy's router sees them.
        let uuid = "3f2b8c1e-9d4a-4c6b-8e2f-1a2b3c4d5e6f";
        assert_eq!(
            chat_route(&post, &format!("/api/v1/chat/sessions/{uuid}")),
            session(uuid)
        );
        assert_eq!(
            chat_route(&post, "/api/v1/chat/sessions/a%20b%2Fc"),
            session("a b/c")
        );
        assert_eq!(
            chat_route(&post, "/api/v1/chat/sessions/%E4%BD%A0"),
            session("你")
        );
        for bad in ["%", "a%2", "%zz", "%FF", "%00x", "%0A", "%20%20"] {
            assert_eq!(
                chat_route(&post, &format!("/api/v1/chat/sessions/{bad}")),
                None,
                "{bad}"
            );
        }
    }
}
