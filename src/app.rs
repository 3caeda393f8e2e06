//! Composition: the one place that wires config, services and background tasks together.
//!
//! `run` starts the production Pingora server with its SIGTERM drain; `LocalServer` starts the
//! same services on ephemeral loopback ports inside the caller's tokio runtime, for tests and
//! benchmarks.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{AdminApp, MetricsApp};
use crate::config::Config;
use crate::proxy::CutoverProxy;
use crate::state::Shared;
use crate::{health, reload};

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

/// SIGTERM: readiness fails at once and Pingora stops accepting; in-flight requests may finish
/// within the grace period. Streams still open near its end get an `error` event instead of a cut
/// connection, and the process exits as soon as nothing is in flight rather than sleeping out
/// the whole grace period.
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
        let grace = Duration::from_secs(self.shared.snapshot().config.server.grace_period_secs);
        tracing::info!(
            grace_secs = grace.as_secs(),
            in_flight = self.shared.requests.count(),
            "SIGTERM: draining"
        );
        self.shared.draining.store(true, Ordering::SeqCst);
        let shared = self.shared.clone();
        std::thread::spawn(move || drain_then_exit(shared, grace));
        ShutdownSignal::GracefulTerminate
    }
}

fn drain_then_exit(shared: Arc<Shared>, grace: Duration) {
    let start = Instant::now();
    // Leave the last second of the grace period for error events to reach clients.
    let cutoff_at = start + grace.saturating_sub(Duration::from_secs(1));
    let mut cut = false;
    loop {
        if shared.requests.count() == 0 {
            tracing::info!(
                elapsed_ms = start.elapsed().as_millis() as u64,
                "drained; exiting"
            );
            std::process::exit(0);
        }
        let now = Instant::now();
        if !cut && now >= cutoff_at {
            tracing::warn!(
                in_flight = shared.requests.count(),
                "grace period over: ending remaining streams"
            );
            let _ = shared.cutoff.send(true);
            cut = true;
        }
        if now >= start + grace + Duration::from_secs(1) {
            tracing::warn!(
                in_flight = shared.requests.count(),
                "exiting with requests still in flight"
            );
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run the proxy until SIGTERM/SIGINT. Never returns.
pub fn run(config_path: PathBuf, config: Config) -> ! {
    let shared = Shared::new(config.clone());
    let conf = ServerConf {
        threads: config.server.threads,
        // The drain above exits earlier; this only bounds it.
        grace_period_seconds: Some(config.server.grace_period_secs + 2),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        CutoverProxy::new(shared.clone()),
        "cutover-proxy",
    );
    proxy.add_tcp(&config.server.listen);

    let mut admin = Service::new("admin".to_string(), AdminApp::new(shared.clone()));
    admin.add_tcp(&config.server.admin_listen);
    admin.threads = Some(1);

    let mut metrics = Service::new("metrics".to_string(), MetricsApp);
    metrics.add_tcp(&config.server.metrics_listen);
    metrics.threads = Some(1);

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(metrics);
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
        let metrics_addr = serve(Arc::new(MetricsApp), shutdown_rx.clone()).await?;
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
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => return,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let _ = tcp.set_nodelay(true);
            let (app, rx) = (app.clone(), shutdown.clone());
            tokio::spawn(async move {
                let stream: pingora::protocols::Stream =
                    Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
                app.process_new(stream, &rx).await;
            });
        }
    });
    Ok(addr)
}
