//! Hot reload of proxy.toml: on file change (in-place write, rename over it, a Kubernetes
//! ConfigMap `..data` symlink swap, an edit of a symlink's target elsewhere) and on SIGHUP.
//!
//! Directories are watched, not the file's inode, because a rename or a ConfigMap swap replaces
//! the inode: the directory of `path`, and the directory of the file it resolves to when a symlink
//! leads elsewhere (re-resolved after every look, since a ConfigMap swap moves it). Only events
//! that can change the file count: opening or reading it is an event too (inotify `IN_OPEN`), and
//! reacting to those would make the reloader's own read wake it up again, forever. Events about
//! other files of the directory (a log written beside the config) are ignored.
//!
//! A burst of events is one change: the file is looked at once the burst has been quiet for
//! `DEBOUNCE`, and at the latest `DEBOUNCE_MAX` after it began, so a busy directory cannot
//! postpone a reload. A poll every `POLL_EVERY` is the safety net for file systems whose events get
//! lost (network and overlay mounts, a bind-mounted single file).
//!
//! Every look reads the file and compares its bytes with the last ones examined: unchanged bytes
//! cost nothing more, so a refused file is refused (logged, counted) once, not at every poll.
//! SIGHUP always re-examines the file. Changed bytes are parsed and validated, then swapped in
//! with `ArcSwap` (`Shared::apply`); requests in flight keep the snapshot they started with.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::core::config::Config;
use crate::state::Shared;

/// A change is looked at once its events have been quiet this long ...
const DEBOUNCE: Duration = Duration::from_millis(100);
/// ... or this long after its first event, whichever comes first.
const DEBOUNCE_MAX: Duration = Duration::from_millis(300);
/// The safety net for lost events: a read and a byte comparison, so cheap enough to do often
/// enough that even without events an edit takes effect within about a second.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// The result of one reload attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum ReloadResult {
    Applied { restart_only: Vec<&'static str> },
    Unchanged,
    Refused(String),
}

/// Load `path` and swap it in if it is valid and differs from the config in force.
pub fn reload_from(shared: &Shared, path: &Path) -> ReloadResult {
    reload_bytes(shared, path, std::fs::read(path))
}

/// Parse and validate what was read from `path`, and swap it in if it differs.
fn reload_bytes(shared: &Shared, path: &Path, read: std::io::Result<Vec<u8>>) -> ReloadResult {
    let metrics = shared.metrics;
    let parsed = read
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
        .and_then(|bytes| {
            String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))
        })
        .and_then(|text| Config::parse(&text).map_err(|e| e.to_string()));
    let newer = match parsed {
        Ok(c) => c,
        Err(e) => {
            metrics
                .config_reloads_total
                .with_label_values(&["invalid"])
                .inc();
            metrics.config_file_valid.set(0);
            tracing::error!(path = %path.display(), error = %e, "config refused; keeping the last good one");
            return ReloadResult::Refused(e);
        }
    };
    metrics.config_file_valid.set(1);
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
    shared.metrics.config_file_valid.set(1);
}

/// What made the reloader look at the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Start,
    Event,
    Signal,
    Poll,
}

/// The reloader's memory between looks at the file.
struct Checker {
    shared: Arc<Shared>,
    path: PathBuf,
    /// The bytes last examined (`Some(None)`: the file could not be read); `None` before the first
    /// look.
    last: Option<Option<Vec<u8>>>,
}

impl Checker {
    /// Read the file and reload it, unless its bytes are the ones examined last time and the
    /// trigger is not SIGHUP. `None` when nothing was attempted.
    fn check(&mut self, trigger: Trigger) -> Option<ReloadResult> {
        let read = std::fs::read(&self.path);
        let bytes = read.as_ref().ok();
        if trigger != Trigger::Signal && self.last.as_ref().map(Option::as_ref) == Some(bytes) {
            return None;
        }
        self.last = Some(bytes.cloned());
        let result = reload_bytes(&self.shared, &self.path, read);
        match (&result, trigger) {
            (ReloadResult::Unchanged, Trigger::Signal) => {
                tracing::info!(path = %self.path.display(), "SIGHUP: config unchanged")
            }
            (ReloadResult::Unchanged, Trigger::Start | Trigger::Event | Trigger::Poll) => {
                tracing::debug!(path = %self.path.display(), ?trigger, "config unchanged")
            }
            _ => {}
        }
        Some(result)
    }
}

/// Whether a file system event may mean that the config changed: not an open or a read (the
/// reloader's own read is one), and about a file the config path goes through. Events without a
/// path (a queue overflow asking for a rescan) count.
fn may_change(event: &notify::Event, names: &[OsString]) -> bool {
    if let EventKind::Access(kind) = event.kind {
        if kind != AccessKind::Close(AccessMode::Write) {
            return false;
        }
    }
    event.paths.is_empty()
        || event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|n| names.iter().any(|x| x == n)))
}

/// The directory watched for `path`: its parent (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where `path` leads and the names that matter on the way: the file's own name, `..data` (the
/// symlink a ConfigMap swaps), and the name of the file it resolves to.
fn resolve(path: &Path) -> (Option<PathBuf>, Vec<OsString>) {
    let mut names: Vec<OsString> = vec!["..data".into()];
    names.extend(path.file_name().map(OsString::from));
    let target = std::fs::canonicalize(path).ok();
    if let Some(name) = target.as_deref().and_then(Path::file_name) {
        if !names.iter().any(|n| n == name) {
            names.push(name.into());
        }
    }
    (target.as_deref().map(parent_dir), names)
}

/// The directories watched: the config path's and, when a symlink leads out of it, the target's.
struct Watches {
    watcher: RecommendedWatcher,
    dir: PathBuf,
    dir_canonical: Option<PathBuf>,
    /// The target's directory, when it is not `dir`.
    target_dir: Option<PathBuf>,
    names: Arc<RwLock<Vec<OsString>>>,
}

impl Watches {
    fn start(path: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<Watches> {
        let names = Arc::new(RwLock::new(Vec::new()));
        let filter = names.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let relevant = match &res {
                    Ok(event) => may_change(event, &filter.read().unwrap()),
                    // An error may mean events were lost: look.
                    Err(_) => true,
                };
                if relevant {
                    let _ = tx.send(());
                }
            })?;
        let dir = parent_dir(path);
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        let mut watches = Watches {
            watcher,
            dir_canonical: std::fs::canonicalize(&dir).ok(),
            dir,
            target_dir: None,
            names,
        };
        watches.follow(path);
        Ok(watches)
    }

    /// Re-resolve `path` (a ConfigMap swap or a re-pointed symlink moves its target) and watch
    /// the target's directory when it is not the one watched already.
    fn follow(&mut self, path: &Path) {
        let (target_dir, names) = resolve(path);
        *self.names.write().unwrap() = names;
        let wanted =
            target_dir.filter(|t| Some(t) != self.dir_canonical.as_ref() && *t != self.dir);
        if wanted == self.target_dir {
            return;
        }
        if let Some(old) = self.target_dir.take() {
            // Fails when a ConfigMap swap removed the directory already; nothing to undo then.
            let _ = self.watcher.unwatch(&old);
        }
        if let Some(new) = wanted {
            if let Err(e) = self.watcher.watch(&new, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %new.display(), error = %e, "cannot watch the directory the config symlink leads to; relying on SIGHUP and polling");
            }
            self.target_dir = Some(new);
        }
    }
}

/// Watch `path` until `shutdown` turns true.
pub async fn run(shared: Arc<Shared>, path: PathBuf, mut shutdown: watch::Receiver<bool>) {
    mark_loaded(&shared);
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watches = match Watches::start(&path, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(dir = %parent_dir(&path).display(), error = %e, "cannot watch the config directory; relying on SIGHUP and polling");
            None
        }
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGHUP");
            None
        }
    };
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    let mut checker = Checker {
        shared,
        path: path.clone(),
        last: None,
    };
    // The file may have changed between the first load and the watch: look once now.
    let mut trigger = Trigger::Start;

    loop {
        // Reading and validating is blocking work; keep it off the async workers.
        checker = match tokio::task::spawn_blocking(move || {
            checker.check(trigger);
            checker
        })
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "config reload task failed; hot reload stops");
                return;
            }
        };
        if let Some(w) = watches.as_mut() {
            w.follow(&path);
        }

        trigger = tokio::select! {
            _ = shutdown.changed() => return,
            Some(()) = rx.recv() => {
                let first = Instant::now();
                loop {
                    let quiet = tokio::time::sleep(DEBOUNCE);
                    let cap = tokio::time::sleep_until(first + DEBOUNCE_MAX);
                    tokio::select! {
                        more = rx.recv() => if more.is_none() { break },
                        _ = quiet => break,
                        _ = cap => break,
                    }
                }
                Trigger::Event
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading config");
                Trigger::Signal
            }
            _ = poll.tick() => Trigger::Poll,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind, RenameMode};
    use notify::Event;

    fn dir(tag: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let d = std::env::temp_dir().join(format!(
            "cutover-reload-unit-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn text(orgs: &str, listen: &str) -> String {
        format!(
            "[server]\nlisten = \"{listen}\"\n[legacy]\naddress = \"127.0.0.1:3001\"\n\
             [runtime]\naddress = \"127.0.0.1:8000\"\n[rollout]\nruntime_orgs = {orgs}\n"
        )
    }

    /// A fresh directory whose `proxy.toml` moves `orgs` to the runtime, the file, and the
    /// state loaded from it.
    fn loaded(tag: &str, orgs: &str) -> (PathBuf, PathBuf, Arc<Shared>) {
        let d = dir(tag);
        let path = d.join("proxy.toml");
        std::fs::write(&path, text(orgs, "127.0.0.1:1")).unwrap();
        let shared = Shared::new(Config::load(&path).unwrap());
        (d, path, shared)
    }

    fn invalid(shared: &Shared) -> u64 {
        shared
            .metrics
            .config_reloads_total
            .with_label_values(&["invalid"])
            .get()
    }

    #[test]
    fn reload_from_applies_ignores_and_refuses() {
        let (d, path, shared) = loaded("from", "[\"org-a\"]");

        assert_eq!(reload_from(&shared, &path), ReloadResult::Unchanged);

        std::fs::write(&path, text("[\"org-b\"]", "127.0.0.1:1")).unwrap();
        assert_eq!(
            reload_from(&shared, &path),
            ReloadResult::Applied {
                restart_only: vec![]
            }
        );
        assert_eq!(shared.snapshot().config.rollout.runtime_orgs, ["org-b"]);

        std::fs::write(&path, text("[\"org-c\"]", "127.0.0.1:2")).unwrap();
        assert_eq!(
            reload_from(&shared, &path),
            ReloadResult::Applied {
                restart_only: vec!["server.listen"]
            }
        );
        assert_eq!(shared.snapshot().config.rollout.runtime_orgs, ["org-c"]);

        std::fs::write(&path, text("[\"org-d\"", "127.0.0.1:2")).unwrap();
        assert!(matches!(
            reload_from(&shared, &path),
            ReloadResult::Refused(_)
        ));
        std::fs::write(
            &path,
            text("[\"org-d\"]", "127.0.0.1:2") + "[breaker]\nerror_rate = 2\n",
        )
        .unwrap();
        match reload_from(&shared, &path) {
            ReloadResult::Refused(e) => assert!(e.contains("breaker.error_rate"), "{e}"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(&path).unwrap();
        match reload_from(&shared, &path) {
            ReloadResult::Refused(e) => assert!(e.contains("cannot read"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(shared.snapshot().config.rollout.runtime_orgs, ["org-c"]);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_refused_file_is_examined_once_until_it_changes_or_sighup() {
        let (d, path, shared) = loaded("checker", "[]");
        let mut c = Checker {
            shared: shared.clone(),
            path: path.clone(),
            last: None,
        };
        assert_eq!(c.check(Trigger::Start), Some(ReloadResult::Unchanged));
        assert_eq!(c.check(Trigger::Poll), None);

        std::fs::write(&path, "not toml [").unwrap();
        assert!(matches!(
            c.check(Trigger::Event),
            Some(ReloadResult::Refused(_))
        ));
        assert_eq!(c.check(Trigger::Poll), None);
        assert_eq!(c.check(Trigger::Event), None);
        assert!(matches!(
            c.check(Trigger::Signal),
            Some(ReloadResult::Refused(_))
        ));

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            c.check(Trigger::Event),
            Some(ReloadResult::Refused(_))
        ));
        assert_eq!(
            c.check(Trigger::Poll),
            None,
            "a missing file is reported once"
        );

        std::fs::write(&path, text("[\"org-a\"]", "127.0.0.1:1")).unwrap();
        assert!(matches!(
            c.check(Trigger::Poll),
            Some(ReloadResult::Applied { .. })
        ));
        assert_eq!(c.check(Trigger::Poll), None);
        assert_eq!(c.check(Trigger::Signal), Some(ReloadResult::Unchanged));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn refusals_are_counted() {
        let (d, path, shared) = loaded("count", "[]");
        std::fs::write(&path, "[server").unwrap();
        let before = invalid(&shared);
        assert!(matches!(
            reload_from(&shared, &path),
            ReloadResult::Refused(_)
        ));
        // Other unit tests may refuse files concurrently: at least ours was counted.
        assert!(invalid(&shared) > before);
        let _ = std::fs::remove_dir_all(d);
    }

    fn event(kind: EventKind, paths: &[&str]) -> Event {
        let mut e = Event::new(kind);
        e.paths = paths.iter().map(PathBuf::from).collect();
        e
    }

    #[test]
    fn opening_or_reading_the_file_is_not_a_change() {
        let names: Vec<OsString> = vec!["..data".into(), "proxy.toml".into()];
        let f = "/etc/cutover/proxy.toml";
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Any),
        ] {
            assert!(!may_change(&event(kind, &[f]), &names), "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(notify::event::RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(may_change(&event(kind, &[f]), &names), "{kind:?}");
        }
        // A rescan request carries no path.
        assert!(may_change(&event(EventKind::Other, &[]), &names));
    }

    #[test]
    fn only_the_files_the_config_path_goes_through_matter() {
        let names: Vec<OsString> = vec!["..data".into(), "proxy.toml".into()];
        let modify = EventKind::Modify(ModifyKind::Any);
        assert!(!may_change(
            &event(modify, &["/etc/cutover/proxy.log"]),
            &names
        ));
        assert!(!may_change(
            &event(modify, &["/etc/cutover/.proxy.toml.swp"]),
            &names
        ));
        // A rename carries both names; the one that matters is enough.
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(may_change(
            &event(
                rename,
                &["/etc/cutover/.proxy.toml.swp", "/etc/cutover/proxy.toml"]
            ),
            &names
        ));
        assert!(may_change(
            &event(rename, &["/etc/cutover/..data_tmp", "/etc/cutover/..data"]),
            &names
        ));
    }

    #[test]
    fn resolve_follows_symlinks_to_their_target() {
        let d = dir("resolve");
        let elsewhere = d.join("srv");
        let etc = d.join("etc");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(elsewhere.join("real.toml"), "x").unwrap();
        std::os::unix::fs::symlink(elsewhere.join("real.toml"), etc.join("proxy.toml")).unwrap();
        let (target_dir, names) = resolve(&etc.join("proxy.toml"));
        assert_eq!(target_dir, Some(std::fs::canonicalize(&elsewhere).unwrap()));
        assert!(names.iter().any(|n| n == "real.toml"));
        assert!(names.iter().any(|n| n == "proxy.toml"));
        assert!(names.iter().any(|n| n == "..data"));
        // A missing file resolves to nothing but keeps its own name.
        let (none, names) = resolve(&etc.join("missing.toml"));
        assert_eq!(none, None);
        assert!(names.iter().any(|n| n == "missing.toml"));
        let _ = std::fs::remove_dir_all(d);
    }
}
