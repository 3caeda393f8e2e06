//! Composition: the one place that wires config, services and background tasks together.
//!
//! `run` starts the production Pingora server with its SIGTERM drain (`drain`); `LocalServer`
//! (`local`) starts the same services on ephemeral loopback ports inside the caller's tokio
//! runtime, for tests and benchmarks.

mod accept;
pub mod demo;
pub mod drain;
pub mod local;
pub mod logging;
pub mod rollout;

pub use drain::{drain, DrainEnd, CUTOFF_MARGIN, MAX_GRACE};
pub use local::LocalServer;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::core::config::Config;
use crate::ops::admin::{AdminApp, MetricsApp};
use crate::ops::{fleet, health, reload};
use crate::proxy::front_door::{ConnectionCount, FrontDoor};
use crate::proxy::{ChatService, CutoverProxy};
use crate::state::Shared;
use accept::accept_loop;
use drain::{DrainOnSigterm, PINGORA_GRACE_SECS};

struct HealthService(Arc<Shared>);

#[async_trait]
impl BackgroundService for HealthService {
    async fn start(&self, shutdown: watch::Receiver<bool>) {
        health::run(self.0.clone(), shutdown).await
    }
}

struct FleetService(Arc<Shared>);

#[async_trait]
impl BackgroundService for FleetService {
    async fn start(&self, shutdown: watch::Receiver<bool>) {
        fleet::run(
            self.0.clone(),
            Arc::new(crate::ops::prometheus::UpstreamGet::new()),
            shutdown,
        )
        .await
    }
}

struct ReloadService(Arc<Shared>, PathBuf);

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, shutdown: watch::Receiver<bool>) {
        reload::run(self.0.clone(), self.1.clone(), shutdown).await
    }
}

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

/// Pingora's timeouts up to this long run on its own timer (fast, shared per 10 ms); longer
/// ones on tokio's.
const FAST_TIMER_MAX_SECS: u64 = 30;

/// Run the proxy until SIGTERM/SIGINT. Never returns.
pub fn run(config_path: PathBuf, config: Config) -> ! {
    // The proxy port is only checked here (Pingora binds it itself); admin and metrics are kept.
    drop(bind_or_exit("server.listen", &config.server.listen));
    let admin_listener = bind_or_exit("server.admin_listen", &config.server.admin_listen);
    let metrics_listener = bind_or_exit("server.metrics_listen", &config.server.metrics_listen);

    // Pingora's own series live on the default registry: ours join them, one scrape for both.
    let shared = Shared::on_registry(config.clone(), prometheus::default_registry().clone());
    let conf = ServerConf {
        // Every service here runs one thread (the proxy workers are one service each, below);
        // a single-threaded tokio runtime without work stealing is the cheapest scheduler.
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(PINGORA_GRACE_SECS),
        graceful_shutdown_timeout_seconds: Some(1),
        // Pingora keeps a fast timer until its deadline even once cancelled; tokio's goes when
        // cancelled. Legacy's idle timeout (300 s by default) bounds every read from legacy and
        // is nearly always cancelled by the read: on tokio's timer, not one kept per 10 ms
        // bucket for five minutes.
        fast_timeout_to_tokio_threshold_seconds: Some(FAST_TIMER_MAX_SECS),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    // One single-threaded proxy service per worker thread, each with its own listening socket
    // on the port (SO_REUSEPORT), as nginx runs its workers: a connection is served on the
    // thread that accepted it, with that thread's upstream keepalive pool. One multi-threaded
    // Pingora service instead accepts on one thread and hands each connection, and each pooled
    // connection's idle watcher, to a random thread: cross-thread wake-ups on most requests.
    // `server.max_connections` counts the connections of every worker.
    let open = Arc::new(ConnectionCount::default());
    // One chat service for every worker, on both of its paths.
    let chats = Arc::new(ChatService::new(shared.clone()));
    for (i, listen) in worker_listen_addresses(&config.server.listen, config.server.threads)
        .into_iter()
        .enumerate()
    {
        let proxy =
            pingora::proxy::http_proxy(&server.configuration, CutoverProxy::new(chats.clone()));
        let mut front = Service::new(
            format!("cutover-proxy-{i}"),
            FrontDoor::new(proxy, chats.clone(), open.clone()),
        );
        front.threads = Some(1);
        let mut socket = TcpSocketOptions::default();
        socket.so_reuseport = Some(true);
        // The front door and Pingora's session read into their own head and body buffers;
        // Pingora's default 64 KiB read buffer per client connection only adds a copy and
        // resident memory per held stream.
        front.add_listener(
            ListenerConfig::tcp(&listen)
                .tcp_socket_options(socket)
                .l4_buffer(L4BufferSettings::default().read(0)),
        );
        server.add_service(front);
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
        "fleet-signal",
        FleetService(shared.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;

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
