//! `cutover-proxy rollout status` and `rollout plan`: the fleet's scorecard read from Prometheus,
//! judged with the statistics one replica uses (`core::rollout`), shown as a table or JSON, and
//! the proxy.toml that promotes every ready shadow org, as a unified diff.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::core::config::Config;
use crate::core::prometheus::HttpUrl;
use crate::core::rollout::{
    breakers, fleet_orgs, promote, ready_orgs, render_table, unified_diff, FleetAnswers, FleetOrg,
    FleetQueries,
};
use crate::core::scorecard::Thresholds;
use crate::ops::prometheus::{query, UpstreamGet};

/// Deadline of each query.
const QUERY_DEADLINE: Duration = Duration::from_secs(15);

/// What the fleet's series say over the config's window.
struct Fleet {
    orgs: Vec<FleetOrg>,
    breakers: std::collections::BTreeMap<String, u64>,
    unknown_bins: BTreeSet<String>,
}

fn read_fleet(prometheus: &str, selector: &str, config: &Config) -> Result<Fleet, String> {
    let url = HttpUrl::parse(prometheus).map_err(|e| format!("--prometheus: {e}"))?;
    let q = FleetQueries::new(config.breaker.window_secs, selector);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let answers = rt.block_on(async {
        let get = |promql: String| {
            let url = url.clone();
            async move {
                query(&UpstreamGet::new(), &url, &promql, QUERY_DEADLINE)
                    .await
                    .map_err(|e| format!("{promql}: {e}"))
            }
        };
        Ok::<_, String>(FleetAnswers {
            comparisons: get(q.comparisons.clone()).await?,
            timeouts: get(q.timeouts.clone()).await?,
            ttfe: get(q.ttfe.clone()).await?,
            requests: get(q.requests.clone()).await?,
            breakers: get(q.breakers.clone()).await?,
        })
    })?;
    let mut unknown_bins = BTreeSet::new();
    let orgs = fleet_orgs(
        &answers,
        &Thresholds::from_config(config),
        &mut unknown_bins,
    );
    Ok(Fleet {
        orgs,
        breakers: breakers(&answers.breakers),
        unknown_bins,
    })
}

fn warn_unknown_bins(f: &Fleet) {
    if !f.unknown_bins.is_empty() {
        eprintln!(
            "warning: cutover_shadow_ttfe_seconds has buckets this version does not know (le {}): replicas of another version? Their times are left out.",
            f.unknown_bins.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
}

/// The config `status` judges by: the file named, else ./proxy.toml when there is one, else
/// the defaults (a config needs upstream addresses: placeholders that are never used).
fn status_config(path: Option<&Path>) -> Result<(Config, String), String> {
    let load = |p: &Path| {
        Config::load(p)
            .map(|c| (c, p.display().to_string()))
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    match path {
        Some(p) => load(p),
        None if Path::new("proxy.toml").is_file() => load(Path::new("proxy.toml")),
        None => Config::parse(
            "[legacy]\naddress = \"127.0.0.1:1\"\n[runtime]\naddress = \"127.0.0.1:1\"\n",
        )
        .map(|c| (c, "the defaults".to_owned()))
        .map_err(|e| e.to_string()),
    }
}

/// `rollout status --prometheus URL [--json]`.
pub fn status(config: Option<&Path>, prometheus: &str, selector: &str, json: bool) -> ExitCode {
    let (config, from) = match status_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let fleet = match read_fleet(prometheus, selector, &config) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot read the fleet from {prometheus}: {e}");
            return ExitCode::FAILURE;
        }
    };
    warn_unknown_bins(&fleet);
    if json {
        let out = serde_json::json!({ "orgs": fleet.orgs });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return ExitCode::SUCCESS;
    }
    let s = &config.shadow;
    println!(
        "Fleet at {prometheus}, last {} s (breaker.window_secs); [shadow] of {from}: ready_min_samples {}, ready_max_error_rate_delta {}, ready_max_ttfe_ratio {}",
        config.breaker.window_secs, s.ready_min_samples, s.ready_max_error_rate_delta, s.ready_max_ttfe_ratio
    );
    let replicas: Vec<String> = fleet
        .breakers
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    println!(
        "Breakers: {}",
        if replicas.is_empty() {
            "no replica scraped".to_owned()
        } else {
            replicas.join(", ")
        }
    );
    println!();
    print!("{}", render_table(&fleet.orgs));
    ExitCode::SUCCESS
}

/// `rollout plan --prometheus URL --config FILE [--write OUT]`.
pub fn plan(path: &Path, prometheus: &str, selector: &str, write: Option<&Path>) -> ExitCode {
    match plan_inner(path, prometheus, selector, write) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn plan_inner(
    path: &Path,
    prometheus: &str,
    selector: &str,
    write: Option<&Path>,
) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let fleet = read_fleet(prometheus, selector, &config)
        .map_err(|e| format!("cannot read the fleet from {prometheus}: {e}"))?;
    warn_unknown_bins(&fleet);
    let ready = ready_orgs(&fleet.orgs, &config.rollout.shadow_orgs);
    let new = promote(&text, &ready).map_err(|e| format!("{}: {e}", path.display()))?;
    Config::parse(&new).map_err(|e| {
        format!("the promoted config would not pass `cutover-proxy check` ({e}); nothing written")
    })?;
    for org in &config.rollout.shadow_orgs {
        let verdict = fleet
            .orgs
            .iter()
            .find(|o| &o.report.org_id == org)
            .map_or("no comparison in the window", |o| o.report.verdict.as_str());
        let action = if ready.contains(&org.as_str()) {
            "promoted to runtime_orgs"
        } else {
            "stays on shadow_orgs"
        };
        eprintln!("{org}: {verdict}: {action}");
    }
    let name = path.display().to_string();
    print!("{}", unified_diff(&name, &text, &new));
    if let Some(out) = write {
        let same_file = out == path
            || std::fs::canonicalize(out).ok() == std::fs::canonicalize(path).ok() && out.exists();
        if same_file && new == text {
            eprintln!("{}: nothing to change", out.display());
            return Ok(());
        }
        write_atomically(out, &new).map_err(|e| format!("{}: {e}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// Write through a temporary file in the same directory and a rename, so a proxy watching `out`
/// never reads half of it.
fn write_atomically(out: &Path, text: &str) -> std::io::Result<()> {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "proxy.toml".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, out).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
