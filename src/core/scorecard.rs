//! The shadow scorecard: each shadow copy compared with the legacy answer the client really got
//! for the same request, per org over a sliding window, and the verdict on whether an org is
//! ready to move (`[shadow]` thresholds).
//!
//! Three pieces, all pure (time is passed in): [`StreamObserver`] measures an Agent2UI stream
//! from bytes it is shown and never changes; [`Pairing`] joins the two halves of one request,
//! which finish in either order; [`Scorecard`] keeps the comparisons of at most `max_orgs` orgs
//! and reports each as the admin API's `S` object.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};

use crate::core::stats::Outcome;

/// Most comparisons kept per org: the verdict is judged on an org's latest ones in the window,
/// so a busy org costs a fixed amount of memory (about 40 bytes each).
pub const MAX_SAMPLES_PER_ORG: usize = 256;

/// Largest SSE frame whose data an observer keeps to read; a larger one is counted, not kept.
pub const OBSERVED_FRAME_BYTES: usize = 64 * 1024;

/// The longest `event:` name an observer keeps; longer names match no event it looks for.
const MAX_EVENT_NAME: usize = 32;

/// Watches an Agent2UI stream (`event: message` with `{"type":"text","data":{"content"}}`,
/// `error`, `done`) go by: when its first event ended, whether it ended with `done` and had no
/// `error` on the way, and how many characters of text it carried.
///
/// It only reads what it is shown: the caller forwards the bytes as they are. Lines end in LF
/// (a CR before it is dropped), which is how both the legacy API and the proxy's own Agent2UI
/// writer end them. Memory is bounded: a frame over [`OBSERVED_FRAME_BYTES`] still counts as an
/// event (its name is kept) but its data is not, and it is counted in `oversized`.
#[derive(Debug, Default)]
pub struct StreamObserver {
    line: Vec<u8>,
    line_over: bool,
    event: Vec<u8>,
    data: Vec<u8>,
    frame_over: bool,
    in_frame: bool,
    frame_bytes: usize,
    pub first_event: Option<Duration>,
    pub events: u64,
    pub saw_error: bool,
    /// The last event seen was `done`.
    pub ended_done: bool,
    pub text_chars: u64,
    pub oversized: u64,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    data: Option<Content>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    content: Option<String>,
}

impl StreamObserver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Look at the next bytes of the stream, `at` since the request started.
    pub fn feed(&mut self, bytes: &[u8], at: Duration) {
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.push_line_bytes(&rest[..i]);
            self.end_line(at);
            rest = &rest[i + 1..];
        }
        self.push_line_bytes(rest);
    }

    /// Whether the stream ended as a success: `done` last, no `error` on the way.
    pub fn succeeded(&self) -> bool {
        self.ended_done && !self.saw_error
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if self.line_over {
            return;
        }
        if self.line.len() + bytes.len() > OBSERVED_FRAME_BYTES {
            self.line_over = true;
            self.line.clear();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self, at: Duration) {
        let over = std::mem::take(&mut self.line_over);
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() && !over {
            if self.in_frame {
                self.dispatch(at);
            }
            self.line = line;
            return;
        }
        if line.first() != Some(&b':') || over {
            self.in_frame = true;
        }
        if over {
            // Only a data line can be this long in a stream worth reading: its frame is counted.
            self.frame_over = true;
            self.data.clear();
        } else if line.first() != Some(&b':') {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (&line[..], &b""[..]),
            };
            match field {
                b"event" => {
                    self.event.clear();
                    if value.len() <= MAX_EVENT_NAME {
                        self.event.extend_from_slice(value);
                    }
                }
                b"data" if !self.frame_over => {
                    self.frame_bytes += value.len() + 1;
                    if self.frame_bytes > OBSERVED_FRAME_BYTES {
                        self.frame_over = true;
                        self.data.clear();
                    } else {
                        if !self.data.is_empty() {
                            self.data.push(b'\n');
                        }
                        self.data.extend_from_slice(value);
                    }
                }
                _ => {}
            }
        }
        line.clear();
        self.line = line;
    }

    fn dispatch(&mut self, at: Duration) {
        self.events += 1;
        self.first_event.get_or_insert(at);
        let name: &[u8] = if self.event.is_empty() {
            b"message"
        } else {
            &self.event
        };
        self.ended_done = name == b"done";
        match name {
            b"error" => self.saw_error = true,
            b"message" if self.frame_over => self.oversized += 1,
            b"message" => {
                if let Ok(m) = serde_json::from_slice::<Message>(&self.data) {
                    if m.kind == "text" {
                        let chars = m
                            .data
                            .and_then(|d| d.content)
                            .map_or(0, |c| c.chars().count());
                        self.text_chars += chars as u64;
                    }
                }
            }
            _ if self.frame_over => self.oversized += 1,
            _ => {}
        }
        self.event.clear();
        self.data.clear();
        self.frame_over = false;
        self.in_frame = false;
        self.frame_bytes = 0;
    }
}

/// What one path did with one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathSample {
    /// Legacy: `Success` or `Error`; the runtime: `Success`, `Error` or `Timeout`.
    pub outcome: Outcome,
    /// Time to its first event of any kind; `None` when it sent none.
    pub ttfe: Option<Duration>,
    pub duration: Duration,
    pub text_chars: u64,
}

/// One request as both paths answered it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub legacy: PathSample,
    pub runtime: PathSample,
}

/// `cutover_shadow_comparisons_total`'s `result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComparisonResult {
    BothOk,
    RuntimeFailed,
    LegacyFailed,
    BothFailed,
}

impl ComparisonResult {
    pub const ALL: [ComparisonResult; 4] = [
        ComparisonResult::BothOk,
        ComparisonResult::RuntimeFailed,
        ComparisonResult::LegacyFailed,
        ComparisonResult::BothFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ComparisonResult::BothOk => "both_ok",
            ComparisonResult::RuntimeFailed => "runtime_failed",
            ComparisonResult::LegacyFailed => "legacy_failed",
            ComparisonResult::BothFailed => "both_failed",
        }
    }
}

impl Comparison {
    pub fn result(&self) -> ComparisonResult {
        match (
            self.legacy.outcome.is_failure(),
            self.runtime.outcome.is_failure(),
        ) {
            (false, false) => ComparisonResult::BothOk,
            (false, true) => ComparisonResult::RuntimeFailed,
            (true, false) => ComparisonResult::LegacyFailed,
            (true, true) => ComparisonResult::BothFailed,
        }
    }
}

/// The two halves of one shadowed request, which finish in either order: whichever comes second
/// gets the comparison. A half that has nothing to compare (`None`: the client abandoned the
/// legacy stream, the copy was skipped) settles the pair with no comparison.
#[derive(Debug, Default)]
pub struct Pairing {
    legacy: Option<Option<PathSample>>,
    runtime: Option<Option<PathSample>>,
}

impl Pairing {
    /// The legacy half is over; a second report of the same half is ignored.
    pub fn legacy(&mut self, sample: Option<PathSample>) -> Option<Comparison> {
        if self.legacy.is_none() {
            self.legacy = Some(sample);
            return self.joined();
        }
        None
    }

    /// The runtime half is over; a second report of the same half is ignored.
    pub fn runtime(&mut self, sample: Option<PathSample>) -> Option<Comparison> {
        if self.runtime.is_none() {
            self.runtime = Some(sample);
            return self.joined();
        }
        None
    }

    fn joined(&self) -> Option<Comparison> {
        match (self.legacy, self.runtime) {
            (Some(Some(legacy)), Some(Some(runtime))) => Some(Comparison { legacy, runtime }),
            _ => None,
        }
    }
}

/// `[shadow]`: when an org is `ready`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub min_samples: u64,
    pub max_error_rate_delta: f64,
    pub max_ttfe_ratio: f64,
}

/// One comparison as kept: compact, so that [`MAX_SAMPLES_PER_ORG`] of them stay small.
#[derive(Debug, Clone, Copy)]
struct Kept {
    /// Milliseconds since the scorecard's origin.
    at_ms: u64,
    legacy: KeptPath,
    runtime: KeptPath,
}

/// Times in microseconds (saturating at about 71 minutes); `u32::MAX` ttfe: no event.
#[derive(Debug, Clone, Copy)]
struct KeptPath {
    outcome: Outcome,
    ttfe_us: u32,
    duration_us: u32,
    text_chars: u32,
}

const NO_EVENT: u32 = u32::MAX;

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(NO_EVENT - 1)
}

impl KeptPath {
    fn of(s: &PathSample) -> Self {
        KeptPath {
            outcome: s.outcome,
            ttfe_us: s.ttfe.map_or(NO_EVENT, micros),
            duration_us: micros(s.duration),
            text_chars: u32::try_from(s.text_chars).unwrap_or(u32::MAX),
        }
    }
}

#[derive(Debug)]
struct OrgEntry {
    seq: u64,
    samples: VecDeque<Kept>,
}

/// Per-org comparisons over a sliding window of `span`, for at most `max_orgs` orgs: recording a
/// new org when full evicts the org whose latest comparison is oldest.
#[derive(Debug)]
pub struct Scorecard {
    span: Duration,
    max_orgs: usize,
    origin: Instant,
    orgs: HashMap<String, OrgEntry>,
    /// Recency order: `seq` → org, oldest first.
    lru: BTreeMap<u64, String>,
    seq: u64,
}

impl Scorecard {
    pub fn new(span: Duration, max_orgs: usize, now: Instant) -> Self {
        Scorecard {
            span,
            max_orgs,
            origin: now,
            orgs: HashMap::new(),
            lru: BTreeMap::new(),
            seq: 0,
        }
    }

    fn at_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// Comparisons at or before this are out of the window at `now`.
    fn expired_before(&self, now: Instant) -> Option<u64> {
        let span = u64::try_from(self.span.as_millis()).unwrap_or(u64::MAX);
        self.at_ms(now).checked_sub(span)
    }

    /// Count one comparison for `org`.
    pub fn record(&mut self, org: &str, c: &Comparison, now: Instant) {
        if self.max_orgs == 0 {
            return;
        }
        let kept = Kept {
            at_ms: self.at_ms(now),
            legacy: KeptPath::of(&c.legacy),
            runtime: KeptPath::of(&c.runtime),
        };
        self.seq += 1;
        let seq = self.seq;
        let cutoff = self.expired_before(now);
        if let Some(entry) = self.orgs.get_mut(org) {
            let name = self
                .lru
                .remove(&entry.seq)
                .unwrap_or_else(|| org.to_owned());
            self.lru.insert(seq, name);
            entry.seq = seq;
            prune(&mut entry.samples, cutoff);
            if entry.samples.len() == MAX_SAMPLES_PER_ORG {
                entry.samples.pop_front();
            }
            entry.samples.push_back(kept);
            return;
        }
        self.evict_to(self.max_orgs - 1);
        self.orgs.insert(
            org.to_owned(),
            OrgEntry {
                seq,
                samples: VecDeque::from([kept]),
            },
        );
        self.lru.insert(seq, org.to_owned());
    }

    fn evict_to(&mut self, keep: usize) {
        while self.orgs.len() > keep {
            match self.lru.pop_first() {
                Some((_, org)) => {
                    self.orgs.remove(&org);
                }
                None => break,
            }
        }
    }

    /// The scorecard of one org, or `None` when it is not tracked (no comparison yet, or
    /// evicted). An org whose comparisons all left the window reads as 0 samples, `insufficient`.
    pub fn report(&self, org: &str, t: &Thresholds, now: Instant) -> Option<OrgReport> {
        let entry = self.orgs.get(org)?;
        let cutoff = self.expired_before(now);
        let live = entry
            .samples
            .iter()
            .filter(|k| cutoff.is_none_or(|c| k.at_ms > c));
        Some(OrgReport::judge(org, live, t))
    }

    /// Every tracked org's scorecard, by org id.
    pub fn reports(&self, t: &Thresholds, now: Instant) -> Vec<OrgReport> {
        let mut orgs: Vec<&String> = self.orgs.keys().collect();
        orgs.sort();
        orgs.into_iter()
            .filter_map(|o| self.report(o, t, now))
            .collect()
    }

    /// Apply a reloaded config: a changed span keeps the comparisons (each is judged by its own
    /// time); a lower `max_orgs` evicts the least recently recorded orgs.
    pub fn reconfigure(&mut self, span: Duration, max_orgs: usize) {
        self.span = span;
        self.max_orgs = max_orgs;
        self.evict_to(max_orgs);
    }

    pub fn org_count(&self) -> usize {
        self.orgs.len()
    }

    /// Comparisons held for `org`, in or out of the window.
    pub fn held(&self, org: &str) -> usize {
        self.orgs.get(org).map_or(0, |e| e.samples.len())
    }
}

fn prune(samples: &mut VecDeque<Kept>, cutoff: Option<u64>) {
    let Some(cutoff) = cutoff else { return };
    while samples.front().is_some_and(|k| k.at_ms <= cutoff) {
        samples.pop_front();
    }
}

/// `ready`, `not_ready` or `insufficient`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ready,
    NotReady,
    Insufficient,
}

/// The lower median (nearest rank) of `values`, sorted here; `None` when empty.
pub fn p50(values: &mut [u32]) -> Option<u32> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    Some(values[(values.len() - 1) / 2])
}

/// One path's totals and medians over the window.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PathSummary {
    pub success: u64,
    pub error: u64,
    pub timeout: u64,
    /// Milliseconds; `None` when no sample had a first event.
    pub ttfe_ms_p50: Option<f64>,
    pub duration_ms_p50: Option<f64>,
    pub text_chars_p50: Option<u64>,
}

impl PathSummary {
    fn of<'a>(paths: impl Iterator<Item = &'a KeptPath>) -> Self {
        let mut s = PathSummary::default();
        let (mut ttfe, mut duration, mut chars) = (Vec::new(), Vec::new(), Vec::new());
        for p in paths {
            match p.outcome {
                Outcome::Success => s.success += 1,
                Outcome::Error => s.error += 1,
                Outcome::Timeout => s.timeout += 1,
            }
            if p.ttfe_us != NO_EVENT {
                ttfe.push(p.ttfe_us);
            }
            duration.push(p.duration_us);
            chars.push(p.text_chars);
        }
        let ms = |us: u32| f64::from(us) / 1000.0;
        s.ttfe_ms_p50 = p50(&mut ttfe).map(ms);
        s.duration_ms_p50 = p50(&mut duration).map(ms);
        s.text_chars_p50 = p50(&mut chars).map(u64::from);
        s
    }

    /// `(error + timeout) / samples`, 0 with no samples.
    pub fn failure_rate(&self) -> f64 {
        let total = self.success + self.error + self.timeout;
        if total == 0 {
            0.0
        } else {
            (self.error + self.timeout) as f64 / total as f64
        }
    }
}

/// The admin API's `S` object for one org.
#[derive(Debug, Clone, PartialEq)]
pub struct OrgReport {
    pub org_id: String,
    pub samples: u64,
    /// Share of samples where both succeeded or both failed; 0 with no samples.
    pub agreement: f64,
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub legacy: PathSummary,
    pub runtime: PathSummary,
}

impl OrgReport {
    fn judge<'a>(org: &str, kept: impl Iterator<Item = &'a Kept> + Clone, t: &Thresholds) -> Self {
        let legacy = PathSummary::of(kept.clone().map(|k| &k.legacy));
        let runtime = PathSummary::of(kept.clone().map(|k| &k.runtime));
        let samples = kept.clone().count() as u64;
        let agreed = kept
            .filter(|k| k.legacy.outcome.is_failure() == k.runtime.outcome.is_failure())
            .count();
        let agreement = if samples == 0 {
            0.0
        } else {
            agreed as f64 / samples as f64
        };
        let (verdict, reasons) = verdict(samples, &legacy, &runtime, t);
        OrgReport {
            org_id: org.to_owned(),
            samples,
            agreement,
            verdict,
            reasons,
            legacy,
            runtime,
        }
    }
}

/// The verdict and its reasons: `insufficient` under `min_samples`; otherwise `not_ready` when
/// the runtime's failure rate exceeds legacy's by more than the delta, or its median time to
/// first event is more than the ratio times legacy's (at least 1 ms); else `ready`.
pub fn verdict(
    samples: u64,
    legacy: &PathSummary,
    runtime: &PathSummary,
    t: &Thresholds,
) -> (Verdict, Vec<String>) {
    if samples < t.min_samples {
        return (
            Verdict::Insufficient,
            vec![format!(
                "{samples} samples < ready_min_samples {}",
                t.min_samples
            )],
        );
    }
    let mut reasons = Vec::new();
    let (r, l) = (runtime.failure_rate(), legacy.failure_rate());
    // Compared in whole basis points, so rates printed equal never trip on float noise.
    let bp = |x: f64| (x * 10_000.0).round() as i64;
    if bp(r) > bp(l) + bp(t.max_error_rate_delta) {
        reasons.push(format!(
            "runtime error rate {r:.2} > legacy {l:.2} + {:.2}",
            t.max_error_rate_delta
        ));
    }
    let legacy_ttfe = legacy.ttfe_ms_p50.unwrap_or(0.0).max(1.0);
    if let Some(rt) = runtime.ttfe_ms_p50 {
        if rt > t.max_ttfe_ratio * legacy_ttfe {
            reasons.push(format!(
                "runtime ttfe p50 {rt:.0} ms > {} x legacy {legacy_ttfe:.0} ms",
                t.max_ttfe_ratio
            ));
        }
    }
    if reasons.is_empty() {
        (Verdict::Ready, reasons)
    } else {
        (Verdict::NotReady, reasons)
    }
}

impl Serialize for OrgReport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("OrgReport", 7)?;
        s.serialize_field("orgId", &self.org_id)?;
        s.serialize_field("samples", &self.samples)?;
        s.serialize_field("agreement", &self.agreement)?;
        s.serialize_field("verdict", &self.verdict)?;
        s.serialize_field("reasons", &self.reasons)?;
        s.serialize_field("legacy", &Legacy(&self.legacy))?;
        s.serialize_field("runtime", &self.runtime)?;
        s.end()
    }
}

/// Legacy's half of `S`: no `timeout` (a legacy answer either ends with `done` or it fails).
struct Legacy<'a>(&'a PathSummary);

impl Serialize for Legacy<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let mut s = serializer.serialize_struct("Legacy", 5)?;
        s.serialize_field("success", &p.success)?;
        s.serialize_field("error", &(p.error + p.timeout))?;
        s.serialize_field("ttfeMsP50", &p.ttfe_ms_p50)?;
        s.serialize_field("durationMsP50", &p.duration_ms_p50)?;
        s.serialize_field("textCharsP50", &p.text_chars_p50)?;
        s.end()
    }
}

impl Serialize for PathSummary {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Runtime", 6)?;
        s.serialize_field("success", &self.success)?;
        s.serialize_field("error", &self.error)?;
        s.serialize_field("timeout", &self.timeout)?;
        s.serialize_field("ttfeMsP50", &self.ttfe_ms_p50)?;
        s.serialize_field("durationMsP50", &self.duration_ms_p50)?;
        s.serialize_field("textCharsP50", &self.text_chars_p50)?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn text(content: &str) -> String {
        format!(
            "event: message\ndata: {}\n\n",
            serde_json::json!({"id": "m", "type": "text", "data": {"content": content}})
        )
    }

    const DONE: &str = "event: done\ndata: {\"executionMode\":\"direct_llm\"}\n\n";
    const ERROR: &str = "event: error\ndata: {\"code\":\"LLM\",\"message\":\"no\"}\n\n";

    fn observe(chunks: &[&[u8]]) -> StreamObserver {
        let mut o = StreamObserver::new();
        for (i, c) in chunks.iter().enumerate() {
            o.feed(c, MS * (i as u32 + 1));
        }
        o
    }

    fn sample(outcome: Outcome, ttfe_ms: u64) -> PathSample {
        PathSample {
            outcome,
            ttfe: Some(MS * ttfe_ms as u32),
            duration: MS * 100,
            text_chars: 10,
        }
    }

    fn cmp(legacy: Outcome, runtime: Outcome, runtime_ttfe_ms: u64) -> Comparison {
        Comparison {
            legacy: sample(legacy, 100),
            runtime: sample(runtime, runtime_ttfe_ms),
        }
    }

    const T: Thresholds = Thresholds {
        min_samples: 10,
        max_error_rate_delta: 0.02,
        max_ttfe_ratio: 2.0,
    };

    #[test]
    fn a_legacy_answer_is_measured() {
        let stream = format!("{}{}{DONE}", text("Legacy"), text(" 你好"));
        let o = observe(&[stream.as_bytes()]);
        assert_eq!(o.events, 3);
        assert_eq!(o.first_event, Some(MS));
        assert_eq!(o.text_chars, 9, "characters, not bytes");
        assert!(o.succeeded());
    }

    #[test]
    fn an_error_on_the_way_fails_even_when_done_follows() {
        let stream = format!("{}{ERROR}{DONE}", text("x"));
        let o = observe(&[stream.as_bytes()]);
        assert!(o.saw_error && o.ended_done);
        assert!(!o.succeeded());
        assert!(!observe(&[text("cut short").as_bytes()]).succeeded());
        assert!(!observe(&[]).succeeded());
    }

    #[test]
    fn first_event_is_when_its_frame_ended() {
        let t = text("a");
        let (head, tail) = t.as_bytes().split_at(t.len() - 1);
        let o = observe(&[head, tail]);
        assert_eq!(o.first_event, Some(MS * 2));
    }

    #[test]
    fn crlf_lines_comments_and_default_event_names() {
        let o = observe(&[
            b": ping\r\n\r\ndata: {\"type\":\"text\",\"data\":{\"content\":\"abc\"}}\r\n\r\nevent: done\r\ndata: {}\r\n\r\n",
        ]);
        assert_eq!(o.events, 2, "a comment alone is no event");
        assert_eq!(o.text_chars, 3);
        assert!(o.succeeded());
    }

    #[test]
    fn an_oversized_frame_is_counted_not_kept_and_the_stream_goes_on() {
        let big = "x".repeat(OBSERVED_FRAME_BYTES * 2);
        let huge = text(&big);
        let mut o = StreamObserver::new();
        for piece in huge.as_bytes().chunks(1000) {
            o.feed(piece, MS);
            assert!(o.line.len() <= OBSERVED_FRAME_BYTES && o.data.len() <= OBSERVED_FRAME_BYTES);
        }
        o.feed(text("ok").as_bytes(), MS);
        o.feed(DONE.as_bytes(), MS);
        assert_eq!(o.oversized, 1);
        assert_eq!(o.events, 3);
        assert_eq!(o.text_chars, 2);
        assert!(o.succeeded());
    }

    #[test]
    fn many_data_lines_over_the_limit_are_counted_too() {
        let line = format!("data: {}\n", "y".repeat(1000));
        let mut o = StreamObserver::new();
        o.feed(b"event: message\n", MS);
        for _ in 0..(OBSERVED_FRAME_BYTES / 1000 + 5) {
            o.feed(line.as_bytes(), MS);
        }
        assert!(o.data.len() <= OBSERVED_FRAME_BYTES);
        o.feed(b"\n", MS);
        assert_eq!((o.events, o.oversized), (1, 1));
    }

    #[test]
    fn pairs_join_in_either_order_once() {
        let c = cmp(Outcome::Success, Outcome::Error, 5);
        let mut p = Pairing::default();
        assert_eq!(p.legacy(Some(c.legacy)), None);
        assert_eq!(p.runtime(Some(c.runtime)), Some(c));
        assert_eq!(p.runtime(Some(c.runtime)), None, "settled once");
        let mut p = Pairing::default();
        assert_eq!(p.runtime(Some(c.runtime)), None);
        assert_eq!(p.legacy(Some(c.legacy)), Some(c));
    }

    #[test]
    fn a_missing_half_settles_the_pair_with_nothing() {
        let c = cmp(Outcome::Success, Outcome::Success, 5);
        let mut p = Pairing::default();
        assert_eq!(p.legacy(None), None);
        assert_eq!(p.runtime(Some(c.runtime)), None);
        let mut p = Pairing::default();
        assert_eq!(p.runtime(None), None);
        assert_eq!(p.legacy(Some(c.legacy)), None);
    }

    #[test]
    fn results_name_who_failed() {
        use Outcome::*;
        let r = |l, rt| cmp(l, rt, 1).result().as_str();
        assert_eq!(r(Success, Success), "both_ok");
        assert_eq!(r(Success, Timeout), "runtime_failed");
        assert_eq!(r(Error, Success), "legacy_failed");
        assert_eq!(r(Error, Error), "both_failed");
    }

    fn card_with(n: usize, mut f: impl FnMut(usize) -> Comparison) -> (Scorecard, Instant) {
        let t0 = Instant::now();
        let mut s = Scorecard::new(Duration::from_secs(300), 10, t0);
        for i in 0..n {
            s.record("org-a", &f(i), t0);
        }
        (s, t0)
    }

    #[test]
    fn too_few_samples_are_insufficient() {
        let (s, t0) = card_with(9, |_| cmp(Outcome::Success, Outcome::Success, 100));
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(r.verdict, Verdict::Insufficient);
        assert_eq!(r.reasons, ["9 samples < ready_min_samples 10"]);
        assert!(s.report("org-b", &T, t0).is_none());
    }

    #[test]
    fn a_runtime_as_good_as_legacy_is_ready() {
        let (s, t0) = card_with(10, |_| cmp(Outcome::Success, Outcome::Success, 200));
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(
            (r.verdict, r.samples, r.agreement),
            (Verdict::Ready, 10, 1.0)
        );
        assert!(r.reasons.is_empty());
        assert_eq!(r.runtime.ttfe_ms_p50, Some(200.0));
        assert_eq!(r.legacy.ttfe_ms_p50, Some(100.0));
    }

    #[test]
    fn a_failing_runtime_is_not_ready_with_the_error_rate_reason() {
        let (s, t0) = card_with(10, |i| {
            let rt = if i < 4 {
                Outcome::Error
            } else {
                Outcome::Success
            };
            cmp(Outcome::Success, rt, 100)
        });
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(r.verdict, Verdict::NotReady);
        assert_eq!(r.reasons, ["runtime error rate 0.40 > legacy 0.00 + 0.02"]);
        assert_eq!(r.agreement, 0.6);
        assert_eq!((r.runtime.success, r.runtime.error), (6, 4));
    }

    #[test]
    fn timeouts_count_as_runtime_failures() {
        let (s, t0) = card_with(10, |i| {
            let rt = if i == 0 {
                Outcome::Timeout
            } else {
                Outcome::Success
            };
            cmp(Outcome::Success, rt, 100)
        });
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(r.runtime.timeout, 1);
        assert_eq!(r.reasons, ["runtime error rate 0.10 > legacy 0.00 + 0.02"]);
    }

    #[test]
    fn exactly_the_delta_is_still_ready() {
        // Legacy fails 1 in 50, the runtime 2 in 50: 0.04 = 0.02 + 0.02.
        let t = Thresholds {
            min_samples: 50,
            ..T
        };
        let (s, t0) = card_with(50, |i| {
            let l = if i == 0 {
                Outcome::Error
            } else {
                Outcome::Success
            };
            let rt = if i < 2 {
                Outcome::Error
            } else {
                Outcome::Success
            };
            cmp(l, rt, 100)
        });
        assert_eq!(s.report("org-a", &t, t0).unwrap().verdict, Verdict::Ready);
    }

    #[test]
    fn a_slow_first_event_trips_the_ttfe_ratio() {
        let (s, t0) = card_with(10, |_| cmp(Outcome::Success, Outcome::Success, 201));
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(r.verdict, Verdict::NotReady);
        assert_eq!(r.reasons, ["runtime ttfe p50 201 ms > 2 x legacy 100 ms"]);
    }

    #[test]
    fn legacy_ttfe_is_taken_as_at_least_one_millisecond() {
        let (s, t0) = card_with(10, |_| Comparison {
            legacy: PathSample {
                ttfe: Some(Duration::from_micros(10)),
                ..sample(Outcome::Success, 0)
            },
            runtime: PathSample {
                ttfe: Some(Duration::from_micros(1900)),
                ..sample(Outcome::Success, 0)
            },
        });
        assert_eq!(s.report("org-a", &T, t0).unwrap().verdict, Verdict::Ready);
    }

    #[test]
    fn samples_leave_the_window() {
        let t0 = Instant::now();
        let mut s = Scorecard::new(Duration::from_secs(60), 10, t0);
        let c = cmp(Outcome::Success, Outcome::Success, 1);
        s.record("org-a", &c, t0);
        s.record("org-a", &c, t0 + Duration::from_secs(30));
        assert_eq!(
            s.report("org-a", &T, t0 + Duration::from_secs(59))
                .unwrap()
                .samples,
            2
        );
        assert_eq!(
            s.report("org-a", &T, t0 + Duration::from_secs(61))
                .unwrap()
                .samples,
            1
        );
        let gone = s
            .report("org-a", &T, t0 + Duration::from_secs(200))
            .unwrap();
        assert_eq!((gone.samples, gone.verdict), (0, Verdict::Insufficient));
        assert_eq!(gone.runtime.ttfe_ms_p50, None);
        s.record("org-a", &c, t0 + Duration::from_secs(200));
        assert_eq!(s.held("org-a"), 1, "expired samples are dropped on record");
    }

    #[test]
    fn the_json_is_the_contract_s() {
        let (s, t0) = card_with(1, |_| cmp(Outcome::Error, Outcome::Timeout, 3));
        let v = serde_json::to_value(s.report("org-a", &T, t0).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "orgId": "org-a", "samples": 1, "agreement": 1.0, "verdict": "insufficient",
                "reasons": ["1 samples < ready_min_samples 10"],
                "legacy": {"success": 0, "error": 1, "ttfeMsP50": 100.0, "durationMsP50": 100.0, "textCharsP50": 10},
                "runtime": {"success": 0, "error": 0, "timeout": 1, "ttfeMsP50": 3.0, "durationMsP50": 100.0, "textCharsP50": 10},
            })
        );
    }

    #[test]
    fn p50_is_the_lower_median() {
        assert_eq!(p50(&mut []), None);
        assert_eq!(p50(&mut [5]), Some(5));
        assert_eq!(p50(&mut [9, 1]), Some(1));
        assert_eq!(p50(&mut [3, 9, 1]), Some(3));
    }

    proptest! {
        #[test]
        fn any_cut_of_a_stream_is_observed_the_same(
            words in proptest::collection::vec("[a-zé你 ]{0,12}", 0..6),
            error in any::<bool>(),
            cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            let mut stream = String::new();
            for w in &words {
                stream.push_str(&text(w));
            }
            if error {
                stream.push_str(ERROR);
            }
            stream.push_str(DONE);
            let whole = observe(&[stream.as_bytes()]);
            let bytes = stream.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            points.sort_unstable();
            let mut o = StreamObserver::new();
            let mut from = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                o.feed(&bytes[from..p], MS);
                from = p;
            }
            let chars: usize = words.iter().map(|w| w.chars().count()).sum();
            prop_assert_eq!(o.text_chars, chars as u64);
            prop_assert_eq!(o.events, whole.events);
            prop_assert_eq!(o.succeeded(), !error);
            prop_assert_eq!(o.events as usize, words.len() + usize::from(error) + 1);
        }

        #[test]
        fn orgs_and_samples_stay_bounded(
            steps in proptest::collection::vec((0u16..40, 0u8..3, 0u8..2, 0u64..2000), 1..400),
            max_orgs in 1usize..8,
        ) {
            let t0 = Instant::now();
            let mut s = Scorecard::new(Duration::from_secs(300), max_orgs, t0);
            let mut last = None;
            for (org, rt, l, ttfe) in steps {
                let outcome = [Outcome::Success, Outcome::Error, Outcome::Timeout][rt as usize];
                let legacy = [Outcome::Success, Outcome::Error][l as usize];
                let org = format!("org-{org}");
                s.record(&org, &cmp(legacy, outcome, ttfe), t0);
                prop_assert!(s.org_count() <= max_orgs);
                prop_assert!(s.held(&org) <= MAX_SAMPLES_PER_ORG);
                last = Some(org);
            }
            // The org recorded last is never the one evicted.
            let last = last.unwrap();
            let r = s.report(&last, &T, t0).unwrap();
            prop_assert!(r.samples >= 1);
            prop_assert_eq!(r.samples, r.runtime.success + r.runtime.error + r.runtime.timeout);
            prop_assert_eq!(r.samples, r.legacy.success + r.legacy.error);
            prop_assert!((0.0..=1.0).contains(&r.agreement));
            prop_assert_eq!(r.verdict == Verdict::Ready, r.reasons.is_empty());
            prop_assert_eq!(s.reports(&T, t0).len(), s.org_count());
        }

        #[test]
        fn verdict_is_monotonic_in_runtime_failures(fails in 0u64..60) {
            // More runtime failures can only move a verdict from ready towards not_ready.
            let (s, t0) = card_with(60, |i| {
                let rt = if (i as u64) < fails { Outcome::Error } else { Outcome::Success };
                cmp(Outcome::Success, rt, 100)
            });
            let t = Thresholds { min_samples: 60, ..T };
            let r = s.report("org-a", &t, t0).unwrap();
            prop_assert_eq!(r.verdict == Verdict::Ready, fails <= 1);
        }
    }
}
