//! `cutover-proxy rollout status|plan` without I/O: the PromQL that reads the fleet's scorecard
//! series, the per-org tallies and reports built from the answers (judged by
//! [`OrgReport::judge`], the code that judges one replica's), the table an operator reads, and the
//! proxy.toml edit that promotes the ready shadow orgs, as a unified diff.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use crate::core::prometheus::Sample;
use crate::core::scorecard::{
    OrgReport, Tally, Thresholds, Verdict, TTFE_BINS, TTFE_BOUNDS_SECONDS,
};

/// The queries of `rollout status`, over `window_secs`, each series narrowed by `selector`
/// (PromQL label matchers, e.g. `namespace="prod"`; "" for none).
#[derive(Debug, Clone)]
pub struct FleetQueries {
    pub comparisons: String,
    pub timeouts: String,
    pub ttfe: String,
    pub requests: String,
    pub breakers: String,
}

impl FleetQueries {
    pub fn new(window_secs: u64, selector: &str) -> FleetQueries {
        let sel = |first: &str| {
            if selector.trim().is_empty() {
                format!("{{{first}}}")
            } else {
                format!("{{{first},{}}}", selector.trim())
            }
        };
        // Each series' growth over the window, exactly: its value now less its value a window
        // ago, or less 0 for a series younger than the window (every one starts at 0: the proxy
        // exports its labels from startup). `increase()` would extrapolate to the window's
        // edges, which over a young series overstates the count by up to a scrape interval's
        // share. A replica restarted within the window counts from its restart: fewer samples,
        // never more.
        let growth = |series: &str, first: &str| {
            let s = format!("{series}{}", sel(first));
            format!("clamp_min({s} - ({s} offset {window_secs}s or {s} * 0), 0)")
        };
        FleetQueries {
            comparisons: format!(
                "sum by (org, result) ({})",
                growth("cutover_shadow_comparisons_total", "org!=\"\"")
            ),
            timeouts: format!(
                "sum by (org) ({})",
                growth("cutover_shadow_runtime_timeouts_total", "org!=\"\"")
            ),
            ttfe: format!(
                "sum by (org, path, le) ({})",
                growth("cutover_shadow_ttfe_seconds_bucket", "org!=\"\"")
            ),
            requests: format!(
                "sum by (org, mode) ({})",
                growth("chat_requests_total", "org!~\"|other\"")
            ),
            breakers: format!(
                "count by (state) (chat_runtime_breaker_state{} == 1)",
                sel("state=~\".+\"")
            ),
        }
    }
}

/// The fleet's answers to [`FleetQueries`].
#[derive(Debug, Clone, Default)]
pub struct FleetAnswers {
    pub comparisons: Vec<Sample>,
    pub timeouts: Vec<Sample>,
    pub ttfe: Vec<Sample>,
    pub requests: Vec<Sample>,
    pub breakers: Vec<Sample>,
}

/// One org as the fleet saw it over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetOrg {
    pub report: OrgReport,
    /// Chat requests by mode (`chat_requests_total`: only orgs the config names carry `org`).
    pub requests: BTreeMap<String, u64>,
}

impl FleetOrg {
    /// The mode most of its requests were served in, with its share: `direct_llm 100%`; `-`
    /// with no request labelled with the org.
    pub fn mode(&self) -> String {
        let total: u64 = self.requests.values().sum();
        match self.requests.iter().max_by_key(|(_, n)| **n) {
            Some((mode, n)) if total > 0 => {
                format!("{mode} {:.0}%", *n as f64 * 100.0 / total as f64)
            }
            _ => "-".to_owned(),
        }
    }
}

impl Serialize for FleetOrg {
    /// The `S` object of `GET /runtime/shadow`, plus `requests` by mode.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Json<'a> {
            #[serde(flatten)]
            report: &'a OrgReport,
            requests: &'a BTreeMap<String, u64>,
        }
        Json {
            report: &self.report,
            requests: &self.requests,
        }
        .serialize(serializer)
    }
}

/// Counts as Prometheus gives them (floats): to the nearest whole one, never negative.
fn whole(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

fn label<'a>(s: &'a Sample, name: &str) -> &'a str {
    s.labels.get(name).map_or("", String::as_str)
}

/// The bin of an `le` label, if it is one of this version's bounds (`+Inf` the last bin).
fn bin_of_le(le: &str) -> Option<usize> {
    if le == "+Inf" {
        return Some(TTFE_BINS - 1);
    }
    let v: f64 = le.parse().ok()?;
    TTFE_BOUNDS_SECONDS
        .iter()
        .position(|b| (*b - v).abs() <= 1e-12 * b.max(1.0))
}

/// Every org of the answers, judged with `t`, by org id. `unknown_bins` collects the `le`
/// values this version does not know (replicas of another version), whose buckets are left out.
pub fn fleet_orgs(
    a: &FleetAnswers,
    t: &Thresholds,
    unknown_bins: &mut BTreeSet<String>,
) -> Vec<FleetOrg> {
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    // Cumulative bucket counts per org and path, then per-bin counts.
    let mut cumulative: BTreeMap<(String, String), [u64; TTFE_BINS]> = BTreeMap::new();
    let mut requests: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for s in &a.comparisons {
        let t = tallies.entry(label(s, "org").to_owned()).or_default();
        let n = whole(s.value);
        match label(s, "result") {
            "both_ok" => t.both_ok += n,
            "runtime_failed" => t.runtime_failed += n,
            "legacy_failed" => t.legacy_failed += n,
            "both_failed" => t.both_failed += n,
            _ => {}
        }
    }
    for s in &a.timeouts {
        tallies
            .entry(label(s, "org").to_owned())
            .or_default()
            .runtime_timeouts += whole(s.value);
    }
    for s in &a.ttfe {
        let le = label(s, "le");
        let Some(bin) = bin_of_le(le) else {
            unknown_bins.insert(le.to_owned());
            continue;
        };
        let key = (label(s, "org").to_owned(), label(s, "path").to_owned());
        cumulative.entry(key).or_insert([0; TTFE_BINS])[bin] += whole(s.value);
    }
    for ((org, path), cum) in cumulative {
        let t = tallies.entry(org).or_default();
        let bins = match path.as_str() {
            "legacy" => &mut t.legacy_ttfe,
            "runtime" => &mut t.runtime_ttfe,
            _ => continue,
        };
        let mut below = 0;
        for (i, c) in cum.iter().enumerate() {
            let c = (*c).max(below);
            bins[i] = c - below;
            below = c;
        }
    }
    for s in &a.requests {
        let n = whole(s.value);
        *requests
            .entry(label(s, "org").to_owned())
            .or_default()
            .entry(label(s, "mode").to_owned())
            .or_default() += n;
        tallies.entry(label(s, "org").to_owned()).or_default();
    }
    tallies
        .into_iter()
        .filter(|(org, _)| !org.is_empty())
        .map(|(org, tally)| {
            let mut tally = tally;
            tally.runtime_timeouts = tally.runtime_timeouts.min(tally.runtime_failures());
            FleetOrg {
                report: OrgReport::judge(&org, &tally, t),
                requests: requests.remove(&org).unwrap_or_default(),
            }
        })
        .collect()
}

/// Replicas by breaker state (`closed`, `open`, `half_open`).
pub fn breakers(samples: &[Sample]) -> BTreeMap<String, u64> {
    samples
        .iter()
        .map(|s| (label(s, "state").to_owned(), whole(s.value)))
        .collect()
}

/// The table an operator reads: one line per org (its reasons below it, indented).
pub fn render_table(orgs: &[FleetOrg]) -> String {
    let mut out = String::new();
    let rows: Vec<[String; 5]> = orgs
        .iter()
        .map(|o| {
            let r = &o.report;
            [
                r.org_id.clone(),
                o.mode(),
                r.samples.to_string(),
                r.verdict.as_str().to_owned(),
                r.samples_needed
                    .map_or("-".into(), |n| format!("~{n} more")),
            ]
        })
        .collect();
    let head = ["ORG", "MODE", "SAMPLES", "VERDICT", "NEEDED"];
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 2 {
                let _ = write!(l, "{cell:>w$}  ");
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        l.trim_end().to_owned()
    };
    out.push_str(&line(&head));
    out.push('\n');
    for (row, o) in rows.iter().zip(orgs) {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
        out.push('\n');
        for reason in &o.report.reasons {
            let _ = writeln!(out, "    - {reason}");
        }
    }
    if orgs.is_empty() {
        out.push_str(
            "(no org: none is on rollout.shadow_orgs or named by the config in the window)\n",
        );
    }
    out
}

/// The orgs `plan` promotes: those on `shadow_orgs` the fleet calls ready.
pub fn ready_orgs<'a>(orgs: &'a [FleetOrg], shadow_orgs: &[String]) -> Vec<&'a str> {
    orgs.iter()
        .filter(|o| o.report.verdict == Verdict::Ready)
        .map(|o| o.report.org_id.as_str())
        .filter(|org| shadow_orgs.iter().any(|s| s == org))
        .collect()
}

/// `text` (a proxy.toml) with `promote` moved from `rollout.shadow_orgs` to
/// `rollout.runtime_orgs` (appended, unless already there), everything else as it was: comments,
/// layout, the order of the other entries.
pub fn promote(text: &str, promote: &[&str]) -> Result<String, String> {
    if promote.is_empty() {
        return Ok(text.to_owned());
    }
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
    let rollout = doc
        .get_mut("rollout")
        .and_then(|i| i.as_table_like_mut())
        .ok_or("no [rollout] table: no org is shadowed")?;
    let shadow = rollout
        .get_mut("shadow_orgs")
        .and_then(|i| i.as_array_mut())
        .ok_or("rollout.shadow_orgs is not an array")?;
    remove_all(shadow, promote);
    if rollout.get("runtime_orgs").is_none() {
        rollout.insert("runtime_orgs", toml_edit::value(toml_edit::Array::new()));
    }
    let runtime = rollout
        .get_mut("runtime_orgs")
        .and_then(|i| i.as_array_mut())
        .ok_or("rollout.runtime_orgs is not an array")?;
    for org in promote {
        if !runtime.iter().any(|v| v.as_str() == Some(org)) {
            append(runtime, org);
        }
    }
    Ok(doc.to_string())
}

/// Remove the entries named, keeping the layout: the first entry left takes the place (and
/// leading whitespace) of the first one removed.
fn remove_all(arr: &mut toml_edit::Array, names: &[&str]) {
    let mut i = 0;
    while i < arr.len() {
        let hit = arr
            .get(i)
            .and_then(|v| v.as_str())
            .is_some_and(|s| names.contains(&s));
        if !hit {
            i += 1;
            continue;
        }
        let removed = arr.remove(i);
        if i == 0 {
            if let Some(next) = arr.get_mut(0) {
                let prefix = removed.decor().prefix().cloned();
                match prefix {
                    Some(p) => next.decor_mut().set_prefix(p),
                    None => next.decor_mut().set_prefix(""),
                }
            }
        }
    }
    if arr.is_empty() {
        arr.set_trailing_comma(false);
        arr.set_trailing("");
    }
}

/// Append `org`, laid out like the entries before it (one a line stays one a line).
fn append(arr: &mut toml_edit::Array, org: &str) {
    let mut v = toml_edit::Value::from(org);
    let prefix = match arr.iter().last() {
        None => String::new(),
        Some(last) => {
            let p = last
                .decor()
                .prefix()
                .and_then(|p| p.as_str())
                .unwrap_or_default()
                .to_owned();
            // The first entry's prefix is what follows `[`: a separator only on its own line.
            if arr.len() > 1 || p.contains('\n') {
                p
            } else {
                " ".to_owned()
            }
        }
    };
    v.decor_mut().set_prefix(prefix);
    v.decor_mut().set_suffix("");
    arr.push_formatted(v);
}

/// A unified diff of `old` to `new`, both named `path` (as `diff -u` names them, so `patch`
/// applies it in place); empty when they are the same.
pub fn unified_diff(path: &str, old: &str, new: &str) -> String {
    if old == new {
        return String::new();
    }
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(path, path)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::scorecard::ttfe_bin;

    fn sample(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    const T: Thresholds = Thresholds {
        min_samples: 20,
        max_error_rate_delta: 0.1,
        max_ttfe_ratio: 2.0,
    };

    fn le(b: f64) -> String {
        format!("{b}")
    }

    #[test]
    fn queries_name_the_series_and_the_selector() {
        let q = FleetQueries::new(300, "namespace=\"prod\"");
        let s = "cutover_shadow_comparisons_total{org!=\"\",namespace=\"prod\"}";
        assert_eq!(
            q.comparisons,
            format!("sum by (org, result) (clamp_min({s} - ({s} offset 300s or {s} * 0), 0))")
        );
        assert!(FleetQueries::new(60, "")
            .ttfe
            .contains("cutover_shadow_ttfe_seconds_bucket{org!=\"\"} offset 60s"));
    }

    #[test]
    fn fleet_answers_make_the_tallies_one_replica_would() {
        // 41 clean comparisons (as a float), legacy at 100 ms, the runtime at 120.
        let mut a = FleetAnswers::default();
        a.comparisons
            .push(sample(&[("org", "org-s"), ("result", "both_ok")], 41.2));
        a.comparisons.push(sample(
            &[("org", "org-s"), ("result", "runtime_failed")],
            0.0,
        ));
        a.timeouts.push(sample(&[("org", "org-s")], 0.0));
        for (path, at) in [("legacy", 0.1), ("runtime", 0.12)] {
            for (i, b) in TTFE_BOUNDS_SECONDS.iter().enumerate() {
                let v = if i >= ttfe_bin(at) { 41.2 } else { 0.0 };
                a.ttfe.push(sample(
                    &[("org", "org-s"), ("path", path), ("le", &le(*b))],
                    v,
                ));
            }
            a.ttfe.push(sample(
                &[("org", "org-s"), ("path", path), ("le", "+Inf")],
                41.2,
            ));
        }
        a.requests
            .push(sample(&[("org", "org-s"), ("mode", "direct_llm")], 44.0));
        a.requests.push(sample(
            &[("org", "org-r"), ("mode", "runtime_orchestrator")],
            3.0,
        ));
        let mut unknown = BTreeSet::new();
        let orgs = fleet_orgs(&a, &T, &mut unknown);
        assert!(unknown.is_empty());
        assert_eq!(orgs.len(), 2);
        let r = &orgs[0];
        assert_eq!(r.report.org_id, "org-r");
        assert_eq!(
            (r.report.samples, r.report.verdict),
            (0, Verdict::Insufficient)
        );
        assert_eq!(r.mode(), "runtime_orchestrator 100%");
        let s = &orgs[1];
        assert_eq!(s.report.samples, 41);
        assert_eq!(s.report.verdict, Verdict::Ready, "{:?}", s.report);
        assert_eq!(s.mode(), "direct_llm 100%");
        let mut local = Tally {
            both_ok: 41,
            ..Tally::default()
        };
        local.legacy_ttfe[ttfe_bin(0.1)] = 41;
        local.runtime_ttfe[ttfe_bin(0.12)] = 41;
        assert_eq!(s.report, OrgReport::judge("org-s", &local, &T));
        let v = serde_json::to_value(s).unwrap();
        assert_eq!(v["requests"], serde_json::json!({"direct_llm": 44}));
        assert_eq!(v["verdict"], "ready");
        assert!(v.get("samplesNeeded").is_some());
        let table = render_table(&orgs);
        assert_eq!(
            table,
            "ORG    MODE                       SAMPLES  VERDICT       NEEDED\n\
             org-r  runtime_orchestrator 100%        0  insufficient  ~20 more\n\
             \x20   - 0 samples < ready_min_samples 20\n\
             org-s  direct_llm 100%                 41  ready         -\n"
        );
    }

    #[test]
    fn unknown_bins_are_named_and_left_out() {
        let a = FleetAnswers {
            ttfe: vec![sample(
                &[("org", "o"), ("path", "runtime"), ("le", "0.25")],
                3.0,
            )],
            ..FleetAnswers::default()
        };
        let mut unknown = BTreeSet::new();
        fleet_orgs(&a, &T, &mut unknown);
        assert_eq!(unknown.into_iter().collect::<Vec<_>>(), ["0.25"]);
    }

    const TOML: &str = r#"# the fleet's config
[server]
listen = "0.0.0.0:8080"

[rollout]
default_mode = "direct_llm"
runtime_orgs = ["org-a"]   # on the runtime
# shadowed until ready
shadow_orgs = ["org-s", "org-t", "org-u"]
"#;

    #[test]
    fn promotion_moves_the_org_and_keeps_the_rest() {
        let out = promote(TOML, &["org-s", "org-u"]).unwrap();
        assert_eq!(
            out,
            TOML.replace(
                "runtime_orgs = [\"org-a\"]",
                "runtime_orgs = [\"org-a\", \"org-s\", \"org-u\"]"
            )
            .replace("[\"org-s\", \"org-t\", \"org-u\"]", "[\"org-t\"]")
        );
        assert_eq!(promote(TOML, &[]).unwrap(), TOML);
        let diff = unified_diff("proxy.toml", TOML, &out);
        assert!(
            diff.starts_with("--- proxy.toml\n+++ proxy.toml\n@@"),
            "{diff}"
        );
        let lines: Vec<&str> = diff.lines().collect();
        assert!(
            lines.contains(&"-shadow_orgs = [\"org-s\", \"org-t\", \"org-u\"]"),
            "{diff}"
        );
        assert!(lines.contains(&"+shadow_orgs = [\"org-t\"]"), "{diff}");
        assert!(lines.contains(&" # shadowed until ready"), "{diff}");
        assert_eq!(unified_diff("proxy.toml", TOML, TOML), "");
    }

    #[test]
    fn promotion_into_an_empty_or_missing_allowlist_and_a_multi_line_one() {
        let none = "[rollout]\nshadow_orgs = [\"org-s\"]\n";
        assert_eq!(
            promote(none, &["org-s"]).unwrap(),
            "[rollout]\nshadow_orgs = []\nruntime_orgs = [\"org-s\"]\n"
        );
        let empty = "[rollout]\nruntime_orgs = []\nshadow_orgs = [\"org-s\"]\n";
        assert_eq!(
            promote(empty, &["org-s"]).unwrap(),
            "[rollout]\nruntime_orgs = [\"org-s\"]\nshadow_orgs = []\n"
        );
        let multi = "[rollout]\nruntime_orgs = [\n  \"org-a\",\n  \"org-b\",\n]\nshadow_orgs = [\n  \"org-s\",  # pilot\n  \"org-t\",\n]\n";
        assert_eq!(
            promote(multi, &["org-s"]).unwrap(),
            "[rollout]\nruntime_orgs = [\n  \"org-a\",\n  \"org-b\",\n  \"org-s\",\n]\nshadow_orgs = [\n  \"org-t\",\n]\n"
        );
        assert!(promote("[server]\n", &["org-s"]).is_err());
        assert!(promote("[rollout]\nshadow_orgs = 3\n", &["org-s"]).is_err());
    }

    #[test]
    fn only_ready_shadow_orgs_are_promoted() {
        let org = |id: &str, v: Verdict| FleetOrg {
            report: OrgReport {
                verdict: v,
                ..OrgReport::judge(id, &Tally::default(), &T)
            },
            requests: BTreeMap::new(),
        };
        let orgs = [
            org("org-s", Verdict::Ready),
            org("org-t", Verdict::NotReady),
            org("org-x", Verdict::Ready),
        ];
        let shadow = ["org-s".to_owned(), "org-t".to_owned()];
        assert_eq!(ready_orgs(&orgs, &shadow), ["org-s"]);
    }
}
