//! The accept loop of the listeners the proxy binds itself (the admin API and `/metrics` in
//! production, every service of a `LocalServer`): one task per connection, handed to an app.

use std::sync::Arc;
use std::time::Duration;

use pingora::apps::ServerApp;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Accept connections and hand each to `app` until `shutdown` turns true.
pub(super) async fn accept_loop<A: ServerApp + Send + Sync + 'static>(
    listener: TcpListener,
    app: Arc<A>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
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
            use pingora::protocols::{GetSocketDigest, SocketDigest};
            use std::os::fd::AsRawFd;
            let mut stream = pingora::protocols::l4::stream::Stream::from(tcp);
            // The client's address, recorded as Pingora's own listener records it at accept.
            let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
            let _ = digest
                .peer_addr
                .set(Some(pingora::protocols::l4::socket::SocketAddr::Inet(peer)));
            stream.set_socket_digest(digest);
            app.process_new(Box::new(stream), &rx).await;
        });
    }
}
