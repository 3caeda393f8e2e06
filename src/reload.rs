//! Hot reload of proxy.toml: on file change (in-place write, rename over it, or a Kubernetes
//! ConfigMap `..data` symlink swap) and on SIGHUP.
//!
//! The directory is watched, not the file's inode, because a rename or a ConfigMap swap replaces
//! the inode. Bursts of events are debounced; the file's content decides whether anything changed.
//! A file that fails to parse or validate is refused, logged and counted, and the last good config
//! stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::state::Shared;

/// Events closer together than this are one change.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A safety net for file systems whose events get lost (some network and overlay mounts).
const POLL_EVERY: Duration = Duration::from_secs(5);

/// The result of one reload attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum ReloadResult {
    Applied { restart_only: Vec<&'static str> },
    Unchanged,
    Refused(String),
}

/// Load `path` and swap it in if it is valid and differs from the config in force.
pub fn reload_from(shared: &Shared, path: &Path) -> ReloadResult {
    let metrics = shared.metrics;
    let newer = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            metrics
                .config_reloads_total
                .with_label_values(&["invalid"])
                .inc();
            tracing::error!(path = %path.display(), error = %e, "config refused; keeping the last good one");
            return ReloadResult::Refused(e.to_string());
        }
    };
    let current = shared.snapshot();
    if current.config == newer {
        return ReloadResult::Unchanged;
    }
    let restart_only = current.config.restart_only_changes(&newer);
    for key in &restart_only {
        tracing::warn!(
            key,
            "changed in the config but only takes effect after a restart"
        );
    }
    shared.apply(newer);
    metrics
        .config_reloads_total
        .with_label_values(&["success"])
        .inc();
    mark_loaded(shared);
    tracing::info!(path = %path.display(), "config reloaded");
    ReloadResult::Applied { restart_only }
}

/// Record the time of the last config that took effect.
pub fn mark_loaded(shared: &Shared) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    shared.metrics.config_last_reload_success.set(now);
}

/// Watch `path` until `shutdown` turns true.
pub async fn run(shared: Arc<Shared>, path: PathBuf, mut shutdown: watch::Receiver<bool>) {
    mark_loaded(&shared);
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let events = tx.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Any event in the directory may concern us: ConfigMaps swap a `..data` symlink, editors
        // write temp files and rename them. The content comparison filters the noise.
        if res.is_ok() {
            let _ = events.send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|_| w));
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot watch the config directory; relying on SIGHUP and polling");
            None
        }
    };
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.tick().await;
    let mut last_refused: Option<Vec<u8>> = None;

    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            Some(()) = rx.recv() => {
                // Debounce: wait until the burst is over.
                loop {
                    tokio::select! {
                        more = rx.recv() => if more.is_none() { break },
                        _ = tokio::time::sleep(DEBOUNCE) => break,
                    }
                }
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading config");
            }
            _ = poll.tick() => {}
        }
        // A refused file is reported once, not at every poll, until its content changes.
        let text = std::fs::read(&path).ok();
        if text.is_some() && text == last_refused {
            continue;
        }
        let (shared, p) = (shared.clone(), path.clone());
        // Reading and validating is blocking work; keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || reload_from(&shared, &p)).await;
        last_refused = match result {
            Ok(ReloadResult::Refused(_)) => text,
            _ => None,
        };
    }
}
