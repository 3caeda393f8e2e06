//! Composition: the one place that wires config, services and background tasks together.
//!
//! `run` starts the production Pingora server with its SIGTERM drain; `LocalServer` starts the
//! same services on ephemeral loopback ports inside the caller's tokio runtime, for tests and
//! benchmarks.

pub mod demo;
pub mod logging;
pub mod state;
pub mod upstream;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::{background_service, BackgroundService};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::state::Shared;
use crate::core::config::Config;
use crate::ops::admin::{AdminApp, MetricsApp};
use crate::ops::{health, reload};
use crate::proxy::CutoverProxy;

struct HealthService(Arc<Shared>);

#[async_trait]
impl BackgroundService for HealthService {
    async fn start(&self, shutdown: watch::Receiver<bool>) {
        health::run(self.0.clone(), shutdown).await
    }
}

struct ReloadService(Arc<Shared>, PathBuf);

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, shutdown: watch::Receiver<bool>) {
        reload::run(self.0.clone(), self.1.clone(), shutdown).await
    }
}

/// SIGTERM starts the drain: readiness fails at once and Pingora's proxy listener stops
/// accepting (the admin and metrics listeners stay up, see `Endpoint`), while a separate thread
/// runs `drain` and ends the process. SIGINT before SIGTERM exits at once.
struct DrainOnSigterm {
    shared: Arc<Shared>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnSigterm {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = int.recv() => {
                tracing::info!("SIGINT: exiting now");
                return ShutdownSignal::FastShutdown;
            }
            _ = term.recv() => {}
        }
        // The value in force now: grace_period_secs is reloadable.
        let grace = Duration::from_secs(self.shared.snapshot().config.server.grace_period_secs)
            .min(MAX_GRACE);
        tracing::info!(
            grace_secs = grace.as_secs(),
            in_flight = self.shared.requests.count(),
            "SIGTERM: draining"
        );
        self.shared.draining.store(true, Ordering::SeqCst);
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("drain".into())
            .spawn(move || drain_then_exit(shared, grace));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the drain thread; exiting now");
            return ShutdownSignal::FastShutdown;
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Nothing was in flight any more.
    Idle,
    /// The grace period ran out with requests still in flight.
    GraceOver,
}

/// Streams still open this long before the grace period ends are told to finish (`cutoff`), so
/// that their `error` event reaches the client before the process exits.
pub const CUTOFF_MARGIN: Duration = Duration::from_secs(1);

/// Wait until no request is in flight, at most `grace`. `CUTOFF_MARGIN` before the end, raise
/// `cutoff`: every runtime stream still open then ends with a `SHUTTING_DOWN` error event and a
/// properly terminated response, which lets those requests finish before the grace period does.
/// Legacy responses, which Pingora proxies byte for byte, are not told; they are cut at the end.
pub async fn drain(shared: &Shared, grace: Duration) -> DrainEnd {
    let grace = grace.min(MAX_GRACE);
    let start = tokio::time::Instant::now();
    let cutoff_at = start + grace.saturating_sub(CUTOFF_MARGIN);
    let end_at = cutoff_at + grace.min(CUTOFF_MARGIN).max(Duration::from_millis(200));
    let mut idle_polls = 0;
    loop {
        // Two idle polls in a row: a request whose header Pingora was reading at SIGTERM time has
        // had the chance to be counted.
        if shared.requests.count() == 0 {
            idle_polls += 1;
            if idle_polls >= 2 {
                return DrainEnd::Idle;
            }
        } else {
            idle_polls = 0;
        }
        let now = tokio::time::Instant::now();
        if now >= cutoff_at && !*shared.cutoff.borrow() {
            tracing::warn!(
                in_flight = shared.requests.count(),
                "grace period nearly over: ending the remaining streams with an error event"
            );
            shared.cutoff.send_replace(true);
        }
        if now >= end_at {
            return DrainEnd::GraceOver;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Run `drain` on its own small runtime, then end the process. A SIGINT during the drain ends it
/// at once. Never returns.
fn drain_then_exit(shared: Arc<Shared>, grace: Duration) {
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let end = match runtime {
        Ok(rt) => rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut int = signal(SignalKind::interrupt()).ok();
            tokio::select! {
                end = drain(&shared, grace) => Some(end),
                Some(()) = async {
                    match int.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                } => None,
            }
        }),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the drain runtime; waiting out the grace period");
            std::thread::sleep(grace);
            Some(DrainEnd::GraceOver)
        }
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let in_flight = shared.requests.count();
    match end {
        Some(DrainEnd::Idle) => tracing::info!(elapsed_ms, "drained; exiting"),
        Some(DrainEnd::GraceOver) if in_flight == 0 => {
            tracing::info!(
                elapsed_ms,
                "drained at the end of the grace period; exiting"
            )
        }
        Some(DrainEnd::GraceOver) => tracing::warn!(
            elapsed_ms,
            in_flight,
            "grace period over: exiting with requests still in flight"
        ),
        None => tracing::warn!(
            elapsed_ms,
            in_flight,
            "SIGINT during the drain: exiting now"
        ),
    }
    std::process::exit(0);
}

/// Pingora's own post-SIGTERM wait. `drain_then_exit` always ends the process within
/// `grace_period_secs` (which is reloadable, so its value at startup is no bound); this only has
/// to outlast it.
const PINGORA_GRACE_SECS: u64 = 24 * 3600;

/// The longest drain: `grace_period_secs` beyond this is taken as this (and cannot overflow a
/// deadline).
pub const MAX_GRACE: Duration = Duration::from_secs(PINGORA_GRACE_SECS - 3600);

/// An HTTP app on a listener bound before the server starts, served on a background service
/// that ignores Pingora's shutdown broadcast: the admin API keeps answering through the drain
/// (`/readyz` 503, `/healthz` 200, `/runtime/*`) and Prometheus can scrape the drain's progress.
/// The process exit closes them.
struct Endpoint<A> {
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    app: Arc<A>,
    /// Never raised: keeps the accept loop's shutdown channel open.
    never: watch::Sender<bool>,
}

impl<A> Endpoint<A> {
    fn new(listener: std::net::TcpListener, app: A) -> Self {
        Endpoint {
            listener: std::sync::Mutex::new(Some(listener)),
            app: Arc::new(app),
            never: watch::channel(false).0,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> BackgroundService for Endpoint<A> {
    async fn start(&self, _shutdown: watch::Receiver<bool>) {
        let Some(std_listener) = self.listener.lock().unwrap().take() else {
            return;
        };
        let listener = match TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve a listener");
                return;
            }
        };
        accept_loop(listener, self.app.clone(), self.never.subscribe()).await
    }
}

/// Bind `addr` for `key`, or exit with a message naming the key: a port already in use must
/// fail the start, not leave a process that looks healthy without its listener. (Pingora retries
/// a taken port for 30 s and then gives up on that service alone.)
fn bind_or_exit(key: &str, addr: &str) -> std::net::TcpListener {
    let bound = std::net::TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    });
    match bound {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(key, addr, error = %e, "cannot listen");
            eprintln!("{key}: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    }
}

/// The listen address spelled once per worker: `host:port`, `host:0port`, `host:00port`, ...
///
/// Pingora keeps one listening socket per address *string* and hands it to every service that
/// names it, so services naming the same string would share (and each close) one socket. Leading
/// zeros give each worker its own string for the same port, hence its own SO_REUSEPORT socket.
fn worker_listen_addresses(listen: &str, workers: usize) -> Vec<String> {
    let (host, port) = listen.rsplit_once(':').unwrap_or((listen, ""));
    (0..workers.max(1))
        .map(|i| format!("{host}:{}{port}", "0".repeat(i)))
        .collect()
}

/// Run the proxy until SIGTERM/SIGINT. Never returns.
pub fn run(config_path: PathBuf, config: Config) -> ! {
    // The proxy port is only checked here (Pingora binds it itself); admin and metrics are kept.
    drop(bind_or_exit("server.listen", &config.server.listen));
    let admin_listener = bind_or_exit("server.admin_listen", &config.server.admin_listen);
    let metrics_listener = bind_or_exit("server.metrics_listen", &config.server.metrics_listen);

    let shared = Shared::new(config.clone());
    let conf = ServerConf {
        // Every service here runs one thread (the proxy workers are one service each, below);
        // a single-threaded tokio runtime without work stealing is the cheapest scheduler.
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(PINGORA_GRACE_SECS),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    // One single-threaded proxy service per worker thread, each with its own listening socket
    // on the port (SO_REUSEPORT), as nginx runs its workers: a connection is served on the
    // thread that accepted it, with that thread's upstream keepalive pool. One multi-threaded
    // Pingora service instead accepts on one thread and hands each connection, and each pooled
    // connection's idle watcher, to a random thread: cross-thread wake-ups on most requests.
    for (i, listen) in worker_listen_addresses(&config.server.listen, config.server.threads)
        .into_iter()
        .enumerate()
    {
        let mut proxy = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            CutoverProxy::new(shared.clone()),
            &format!("cutover-proxy-{i}"),
        );
        proxy.threads = Some(1);
        let mut socket = TcpSocketOptions::default();
        socket.so_reuseport = Some(true);
        // Pingora's session already reads into its own header and body buffers; its default
        // 64 KiB read buffer per client connection only adds a copy and resident memory per
        // held stream.
        proxy.add_listener(
            ListenerConfig::tcp(&listen)
                .tcp_socket_options(socket)
                .l4_buffer(L4BufferSettings::default().read(0)),
        );
        server.add_service(proxy);
    }
    server.add_service(background_service(
        "admin",
        Endpoint::new(admin_listener, AdminApp::new(shared.clone())),
    ));
    server.add_service(background_service(
        "metrics",
        Endpoint::new(metrics_listener, MetricsApp::new(shared.clone())),
    ));
    server.add_service(background_service(
        "runtime-health",
        HealthService(shared.clone()),
    ));
    server.add_service(background_service(
        "config-reload",
        ReloadService(shared.clone(), config_path),
    ));
    tracing::info!(
        listen = %config.server.listen,
        admin = %config.server.admin_listen,
        metrics = %config.server.metrics_listen,
        "cutover-proxy started"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnSigterm { shared }),
    });
    std::process::exit(0)
}

/// The services on ephemeral loopback ports, inside the current tokio runtime.
pub struct LocalServer {
    pub proxy_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl LocalServer {
    /// Start with `config`; `config_path`, when given, is watched for reloads.
    pub async fn start(config: Config, config_path: Option<PathBuf>) -> std::io::Result<Self> {
        let shared = Shared::new(config);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let server_conf = Arc::new(ServerConf::default());

        let proxy = Arc::new(pingora::proxy::http_proxy(
            &server_conf,
            CutoverProxy::new(shared.clone()),
        ));
        let proxy_addr = serve(proxy, shutdown_rx.clone()).await?;
        let admin_addr =
            serve(Arc::new(AdminApp::new(shared.clone())), shutdown_rx.clone()).await?;
        let metrics_addr = serve(
            Arc::new(MetricsApp::new(shared.clone())),
            shutdown_rx.clone(),
        )
        .await?;
        tokio::spawn(health::run(shared.clone(), shutdown_rx.clone()));
        if let Some(path) = config_path {
            tokio::spawn(reload::run(shared.clone(), path, shutdown_rx.clone()));
        }
        Ok(LocalServer {
            proxy_addr,
            admin_addr,
            metrics_addr,
            shared,
            shutdown,
        })
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn serve<A: ServerApp + Send + Sync + 'static>(
    app: Arc<A>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(accept_loop(listener, app, shutdown));
    Ok(addr)
}

/// Accept connections and hand each to `app` until `shutdown` turns true.
async fn accept_loop<A: ServerApp + Send + Sync + 'static>(
    listener: TcpListener,
    app: Arc<A>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (app, rx) = (app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let stream: pingora::protocols::Stream =
                Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
            app.process_new(stream, &rx).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        let config = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[legacy]\naddress = \"127.0.0.1:2\"\n[runtime]\naddress = \"127.0.0.1:3\"\n",
        )
        .unwrap();
        Shared::new(config)
    }

    #[tokio::test]
    async fn an_idle_drain_ends_at_once() {
        let shared = shared();
        let t = Instant::now();
        assert_eq!(
            drain(&shared, Duration::from_secs(30)).await,
            DrainEnd::Idle
        );
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert!(!*shared.cutoff.borrow());
    }

    #[tokio::test]
    async fn the_drain_waits_for_requests_in_flight() {
        let shared = shared();
        let guard = shared.requests.enter();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(guard);
        });
        let t = Instant::now();
        assert_eq!(
            drain(&shared, Duration::from_secs(30)).await,
            DrainEnd::Idle
        );
        assert!(
            t.elapsed() >= Duration::from_millis(290),
            "{:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(
            !*shared.cutoff.borrow(),
            "no cutoff while within the grace period"
        );
        release.await.unwrap();
    }

    #[tokio::test]
    async fn streams_are_told_to_finish_before_the_grace_period_ends() {
        let shared = shared();
        let guard = shared.requests.enter();
        // A stream that ends as soon as it is told to, like the relay does.
        let mut cutoff = shared.cutoff.subscribe();
        let stream = tokio::spawn(async move {
            cutoff.wait_for(|c| *c).await.unwrap();
            drop(guard);
            Instant::now()
        });
        let t = Instant::now();
        let end = drain(&shared, Duration::from_millis(1500)).await;
        assert_eq!(end, DrainEnd::Idle);
        let told_after = stream.await.unwrap() - t;
        assert!(told_after >= Duration::from_millis(450), "{told_after:?}");
        assert!(told_after < Duration::from_millis(1000), "{told_after:?}");
    }

    #[tokio::test]
    async fn the_cutoff_is_kept_for_streams_that_start_later() {
        let shared = shared();
        let guard = shared.requests.enter();
        // No stream is subscribed when the cutoff is raised.
        let end = drain(&shared, Duration::from_millis(300)).await;
        assert_eq!(end, DrainEnd::GraceOver);
        assert!(
            *shared.cutoff.subscribe().borrow(),
            "a late subscriber sees the cutoff"
        );
        drop(guard);
    }

    #[tokio::test]
    async fn an_absurd_grace_period_does_not_overflow() {
        let shared = shared();
        assert_eq!(drain(&shared, Duration::MAX).await, DrainEnd::Idle);
    }

    #[tokio::test]
    async fn a_stuck_request_ends_the_drain_at_the_grace_period() {
        let shared = shared();
        let _guard = shared.requests.enter();
        let t = Instant::now();
        assert_eq!(
            drain(&shared, Duration::from_secs(1)).await,
            DrainEnd::GraceOver
        );
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(950), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    #[test]
    fn every_worker_gets_its_own_spelling_of_the_same_listen_address() {
        use std::net::{SocketAddr, ToSocketAddrs};
        for listen in ["127.0.0.1:8080", "0.0.0.0:18120", "[::]:8080", "[::1]:443"] {
            let spellings = worker_listen_addresses(listen, 4);
            assert_eq!(spellings.len(), 4);
            let distinct: std::collections::HashSet<_> = spellings.iter().collect();
            assert_eq!(distinct.len(), 4, "{spellings:?}");
            let want: SocketAddr = listen.parse().unwrap();
            for s in &spellings {
                // Pingora binds through to_socket_addrs: each spelling must be that address.
                let got: Vec<SocketAddr> = s.as_str().to_socket_addrs().unwrap().collect();
                assert_eq!(got, [want], "{s}");
            }
        }
        assert_eq!(worker_listen_addresses("127.0.0.1:80", 1), ["127.0.0.1:80"]);
    }
}
