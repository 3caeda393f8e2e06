//! Prometheus' HTTP query API without I/O: the `[fleet] prometheus_url` and `--prometheus` URL, the
//! request path of an instant query, and its JSON answer read into samples, then into what the
//! breaker ([`FleetCounts`]) and `rollout status` read.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::core::fleet::FleetCounts;

/// An `http://host[:port][/prefix]` URL (no TLS: Prometheus inside the cluster, or a port-forward).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash (a Prometheus behind `--web.route-prefix`); "" for none.
    pub prefix: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
        if rest.contains(['?', '#', '@']) || rest.chars().any(|c| c.is_whitespace()) {
            return Err(format!(
                "{url:?}: no query, fragment, user or spaces, only http://host[:port][/path]"
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let port_of = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{url:?}: bad port {p:?}"))
        };
        let (host, port) = if authority.starts_with('[') {
            let end = authority
                .find(']')
                .ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
            let (host, rest) = authority.split_at(end + 1);
            match rest.strip_prefix(':') {
                Some(p) => (host, port_of(p)?),
                None if rest.is_empty() => (host, 80),
                None => return Err(format!("{url:?}: junk after the host")),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, port_of(p)?),
                None => (authority, 80),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(HttpUrl {
            host: host.to_owned(),
            port,
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }

    /// `host:port`, to connect to (brackets kept for IPv6) and for the `Host` header.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The path and query of an instant query of `promql`.
    pub fn query_path(&self, promql: &str) -> String {
        format!(
            "{}/api/v1/query?query={}",
            self.prefix,
            percent_encode(promql)
        )
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.prefix)
    }
}

/// Percent-encode everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One sample of an instant vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
    #[serde(rename = "errorType", default)]
    error_type: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct VectorSample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

/// The samples of an instant query's answer: `status` `success` with a vector (a scalar reads
/// as one sample without labels). Anything else is an error naming what was wrong.
pub fn parse_vector(body: &[u8]) -> Result<Vec<Sample>, String> {
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| format!("not a Prometheus answer: {e}"))?;
    if answer.status != "success" {
        return Err(format!(
            "Prometheus answered {} ({}): {}",
            answer.status,
            answer.error_type.as_deref().unwrap_or("no type"),
            answer.error.as_deref().unwrap_or("no message")
        ));
    }
    let data = answer.data.ok_or("a success without data")?;
    let number = |v: &str| {
        v.parse::<f64>()
            .map_err(|_| format!("sample value {v:?} is not a number"))
    };
    match data.result_type.as_str() {
        "vector" => {
            let samples: Vec<VectorSample> = serde_json::from_value(data.result)
                .map_err(|e| format!("a vector that is not one: {e}"))?;
            samples
                .into_iter()
                .map(|s| {
                    Ok(Sample {
                        labels: s.metric,
                        value: number(&s.value.1)?,
                    })
                })
                .collect()
        }
        "scalar" => {
            let (_, v): (f64, String) = serde_json::from_value(data.result)
                .map_err(|e| format!("a scalar that is not one: {e}"))?;
            Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: number(&v)?,
            }])
        }
        other => Err(format!("a {other} where a vector was expected")),
    }
}

/// The shipped recording rule the breaker reads by default (deploy/prometheus/rules.yml): the
/// runtime's executions, errors and timeouts over 5 minutes, all replicas, one series per
/// `outcome` (`all`, `error`, `timeout`).
pub const FLEET_RULE: &str = "job_outcome:chat_runtime_executions:increase5m";

/// What the fleet rule computes, over a window of `window_secs`: the rule's own expression
/// for 300 s.
pub fn fleet_expression(window_secs: u64) -> String {
    let range = if window_secs % 60 == 0 {
        format!("{}m", window_secs / 60)
    } else {
        format!("{window_secs}s")
    };
    let part = |series: &str, outcome: &str| {
        format!(
            "label_replace(sum without (instance, pod, mode) (increase({series}{{mode=\"runtime_orchestrator\"}}[{range}])), \"outcome\", \"{outcome}\", \"\", \"\")"
        )
    };
    format!(
        "{}\nor\n{}\nor\n{}",
        part("chat_execution_total", "all"),
        part("chat_execution_error_total", "error"),
        part("chat_execution_timeout_total", "timeout")
    )
}

/// The query the breaker polls: `[fleet] query` when set; else the shipped rule when the window
/// is the rule's 5 minutes, else the rule's expression over `window_secs`.
pub fn fleet_query(configured: &str, window_secs: u64) -> String {
    if !configured.trim().is_empty() {
        configured.to_owned()
    } else if window_secs == 300 {
        FLEET_RULE.to_owned()
    } else {
        fleet_expression(window_secs)
    }
}

/// The fleet's counts from the query's samples: exactly one series for each `outcome` (`all`,
/// `error`, `timeout`), with plausible values. More than one means the query sees several
/// deployments: narrow it with label matchers.
pub fn fleet_counts(samples: &[Sample]) -> Result<FleetCounts, String> {
    let mut found: [Option<f64>; 3] = [None; 3];
    for s in samples {
        let Some(outcome) = s.labels.get("outcome") else {
            return Err("a series without an outcome label".into());
        };
        let i = match outcome.as_str() {
            "all" => 0,
            "error" => 1,
            "timeout" => 2,
            _ => continue,
        };
        if found[i].is_some() {
            return Err(format!(
                "several series for outcome=\"{outcome}\" (several deployments?): narrow [fleet] query with label matchers"
            ));
        }
        found[i] = Some(s.value);
    }
    let [Some(total), Some(error), Some(timeout)] = found else {
        return Err(if samples.is_empty() {
            "no series (are the recording rules loaded and the proxies scraped?)".into()
        } else {
            "outcome=\"all\", \"error\" and \"timeout\" are not all there".into()
        });
    };
    let c = FleetCounts {
        total,
        error,
        timeout,
    };
    if c.is_plausible() {
        Ok(c)
    } else {
        Err(format!(
            "implausible counts: {total} executions, {error} errors, {timeout} timeouts"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://prometheus.monitoring:9090").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("prometheus.monitoring", 9090, "")
        );
        assert_eq!(u.to_string(), "http://prometheus.monitoring:9090");
        let u = HttpUrl::parse("http://10.0.0.1/prom/").unwrap();
        assert_eq!((u.port, u.prefix.as_str()), (80, "/prom"));
        assert_eq!(u.query_path("up"), "/prom/api/v1/query?query=up");
        let u = HttpUrl::parse("http://[::1]:9090").unwrap();
        assert_eq!(u.authority(), "[::1]:9090");
        assert_eq!(HttpUrl::parse("http://[::1]").unwrap().port, 80);
        for bad in [
            "https://p:9090",
            "p:9090",
            "http://",
            "http://p:0",
            "http://p:x",
            "http://p:9090/?a=1",
            "http://u@p",
            "http://p 1",
            "http://[::1",
            "http://a:1:2",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queries_are_percent_encoded() {
        let u = HttpUrl::parse("http://p:1").unwrap();
        assert_eq!(
            u.query_path("sum(x{a=\"b c\"}) or y"),
            "/api/v1/query?query=sum%28x%7Ba%3D%22b%20c%22%7D%29%20or%20y"
        );
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn vectors_scalars_and_errors() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"outcome":"all","job":"p"},"value":[1700000000.1,"12"]},
            {"metric":{"outcome":"error"},"value":[1700000000.1,"NaN"]}]}}"#;
        let v = parse_vector(body).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].labels["outcome"], "all");
        assert_eq!(v[0].value, 12.0);
        assert!(v[1].value.is_nan());
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"3"]}}"#;
        assert_eq!(parse_vector(scalar).unwrap()[0].value, 3.0);
        let err = br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert_eq!(
            parse_vector(err).unwrap_err(),
            "Prometheus answered error (bad_data): parse error"
        );
        for garbage in [
            &b"<html>"[..],
            br#"{"status":"success"}"#,
            br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
            br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"x"]}]}}"#,
            br#"{"status":"success","data":{"resultType":"vector","result":{}}}"#,
        ] {
            assert!(parse_vector(garbage).is_err());
        }
    }

    fn sample(outcome: &str, value: f64) -> Sample {
        Sample {
            labels: [("outcome".to_owned(), outcome.to_owned())].into(),
            value,
        }
    }

    #[test]
    fn fleet_counts_want_one_series_per_outcome() {
        let ok = [
            sample("all", 20.0),
            sample("error", 11.0),
            sample("timeout", 1.0),
        ];
        assert_eq!(
            fleet_counts(&ok).unwrap(),
            FleetCounts {
                total: 20.0,
                error: 11.0,
                timeout: 1.0
            }
        );
        assert!(fleet_counts(&[]).unwrap_err().starts_with("no series"));
        assert!(fleet_counts(&ok[..2]).is_err());
        let twice = [
            ok[0].clone(),
            ok[1].clone(),
            ok[2].clone(),
            sample("all", 3.0),
        ];
        assert!(fleet_counts(&twice)
            .unwrap_err()
            .starts_with("several series"));
        let nan = [sample("all", f64::NAN), ok[1].clone(), ok[2].clone()];
        assert!(fleet_counts(&nan).unwrap_err().starts_with("implausible"));
        let unlabelled = [Sample {
            labels: BTreeMap::new(),
            value: 1.0,
        }];
        assert!(fleet_counts(&unlabelled).is_err());
    }

    #[test]
    fn the_default_query_is_the_shipped_rule() {
        assert_eq!(fleet_query("", 300), FLEET_RULE);
        assert_eq!(fleet_query(" my_query ", 300), " my_query ");
        assert!(fleet_query("", 60).contains("[1m]"));
        assert!(fleet_query("", 90).contains("[90s]"));
        // The rule in deploy/prometheus/rules.yml is this expression over 5 minutes.
        let rules = include_str!("../../deploy/prometheus/rules.yml");
        let at = rules
            .find(&format!("- record: {FLEET_RULE}"))
            .expect("the rule is shipped");
        let expr: Vec<&str> = rules[at..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with("          "))
            .map(str::trim)
            .collect();
        assert_eq!(expr.join("\n"), fleet_expression(300));
    }
}
