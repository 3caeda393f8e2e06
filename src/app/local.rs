//! `LocalServer`: the proxy, admin and metrics services on ephemeral loopback ports inside the
//! caller's tokio runtime, for tests and benchmarks. Each has its own metrics registry.

use std::path::PathBuf;
use std::sync::Arc;

use pingora::apps::ServerApp;
use pingora::server::configuration::ServerConf;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::accept::accept_loop;
use crate::core::config::Config;
use crate::ops::admin::{AdminApp, MetricsApp};
use crate::ops::prometheus::UpstreamGet;
use crate::ops::{fleet, health, reload};
use crate::proxy::front_door::{ConnectionCount, FrontDoor};
use crate::proxy::{ChatService, CutoverProxy};
use crate::state::Shared;

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

        let chats = Arc::new(ChatService::new(shared.clone()));
        let proxy = pingora::proxy::http_proxy(&server_conf, CutoverProxy::new(chats.clone()));
        let proxy = Arc::new(FrontDoor::new(
            proxy,
            chats,
            Arc::new(ConnectionCount::default()),
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
        tokio::spawn(fleet::run(
            shared.clone(),
            Arc::new(UpstreamGet::new()),
            shutdown_rx.clone(),
        ));
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
