//! The floor of an HTTP/1 forwarder on Pingora's lower layer (issue 17): Pingora's `Server`,
//! listeners and workers, but a `ServerApp` of its own on the raw connection instead of
//! pingora-proxy's `HttpProxy`. It reads each request head with `httparse`, forwards the head
//! bytes untouched over a pooled upstream connection, and copies back the response head and its
//! `Content-Length` or chunked body; keep-alive on both sides. GET/HEAD without a body only.
//!
//! A measurement tool for `bench/run.sh` section 1, not the product: no header rewriting, no
//! timeouts, no metrics.
//!
//! ```sh
//! cargo build --release --example lean_forwarder
//! target/release/examples/lean_forwarder 127.0.0.1:18400 127.0.0.1:18081 2
//! ```

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::protocols::Stream;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::listening::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// A body larger than this is written out as it arrives instead of in one write with its head.
const FLUSH_AT: usize = 64 * 1024;
const MAX_IDLE_UPSTREAM: usize = 256;

thread_local! {
    // Every worker is a single-threaded runtime (one service per thread, as cutover-proxy runs
    // them), so a thread-local pool is a per-worker pool with no lock and no cross-thread wake-up.
    // Plain TCP streams: a pooled `TransportConnector` stream would pay `getpeername` per reuse.
    static POOL: RefCell<Vec<TcpStream>> = const { RefCell::new(Vec::new()) };
}

fn pooled() -> Option<TcpStream> {
    POOL.with(|p| p.borrow_mut().pop())
}

fn release(stream: TcpStream) {
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < MAX_IDLE_UPSTREAM {
            pool.push(stream);
        }
    });
}

struct Forwarder {
    upstream: SocketAddr,
}

/// How the response body ends.
enum Body {
    None,
    Length(usize),
    Chunked,
}

/// What the request head says, the rest of it is forwarded as read.
struct RequestHead {
    len: usize,
    head_only: bool,
    keep_alive: bool,
}

/// Errors that end the client connection; `Reject` answers it first.
enum Fail {
    Io,
    Reject(&'static [u8]),
}

impl From<io::Error> for Fail {
    fn from(_: io::Error) -> Self {
        Fail::Io
    }
}

const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const NOT_IMPLEMENTED: &[u8] =
    b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const BAD_GATEWAY: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

fn header_is(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// A head's length once it is complete (`None` while it is not); one httparse refuses is
/// answered with `refusal`.
fn head_len(
    parsed: httparse::Result<usize>,
    refusal: &'static [u8],
) -> Result<Option<usize>, Fail> {
    match parsed {
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(Fail::Reject(refusal)),
    }
}

/// Whether a message's connection stays open: HTTP/1.1's default, or what its `Connection`
/// lines say.
fn keeps_alive(version: Option<u8>, headers: &[httparse::Header]) -> bool {
    let mut keep_alive = version == Some(1);
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
    {
        if header_is(h.value, "close") {
            keep_alive = false;
        } else if header_is(h.value, "keep-alive") {
            keep_alive = true;
        }
    }
    keep_alive
}

fn parse_request(buf: &[u8]) -> Result<Option<RequestHead>, Fail> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Some(len) = head_len(req.parse(buf), BAD_REQUEST)? else {
        return Ok(None);
    };
    let framed = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
    });
    if framed {
        return Err(Fail::Reject(NOT_IMPLEMENTED));
    }
    Ok(Some(RequestHead {
        len,
        head_only: req.method == Some("HEAD"),
        keep_alive: keeps_alive(req.version, req.headers),
    }))
}

/// The response head's length, its body framing and whether the upstream keeps the connection.
fn parse_response(buf: &[u8], head_only: bool) -> Result<Option<(usize, Body, bool)>, Fail> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let Some(len) = head_len(resp.parse(buf), BAD_GATEWAY)? else {
        return Ok(None);
    };
    let code = resp.code.unwrap_or(0);
    let reusable = keeps_alive(resp.version, resp.headers);
    let mut body = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !header_is(h.value, "chunked") {
                return Err(Fail::Reject(BAD_GATEWAY));
            }
            body = Some(Body::Chunked);
        } else if h.name.eq_ignore_ascii_case("content-length") && body.is_none() {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or(Fail::Reject(BAD_GATEWAY))?;
            body = Some(Body::Length(n));
        }
    }
    if code < 200 {
        // No 1xx for a GET in this tool's scope; a close-delimited body neither.
        return Err(Fail::Reject(BAD_GATEWAY));
    }
    let body = if head_only || code == 204 || code == 304 {
        Body::None
    } else {
        body.ok_or(Fail::Reject(BAD_GATEWAY))?
    };
    Ok(Some((len, body, reusable)))
}

/// Where a chunked body is at `buf[pos..]`: `Ok(Some(end))` once the last chunk and the
/// (empty) trailer are in, `Ok(None)` with `pos` moved past every complete chunk otherwise.
fn scan_chunks(buf: &[u8], pos: &mut usize) -> Result<Option<usize>, Fail> {
    loop {
        match httparse::parse_chunk_size(&buf[*pos..]) {
            Ok(httparse::Status::Complete((n, 0))) => {
                // Trailers are not forwarded by this tool's upstreams; the empty line ends it.
                let end = *pos + n + 2;
                return if buf.len() < end {
                    Ok(None)
                } else if &buf[end - 2..end] == b"\r\n" {
                    Ok(Some(end))
                } else {
                    Err(Fail::Reject(BAD_GATEWAY))
                };
            }
            Ok(httparse::Status::Complete((n, size))) => {
                let next = *pos + n + size as usize + 2;
                if buf.len() < next {
                    return Ok(None);
                }
                *pos = next;
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(Fail::Reject(BAD_GATEWAY)),
        }
    }
}

impl Forwarder {
    async fn connect(&self) -> io::Result<TcpStream> {
        let s = TcpStream::connect(self.upstream).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// One request on `up`: the head written, the response read into `resp` and copied to the
    /// client. `Ok(None)` when the upstream failed before the first byte of an answer (a stale
    /// pooled connection): nothing was sent to the client, the request can go again.
    async fn exchange(
        &self,
        client: &mut Stream,
        up: &mut TcpStream,
        head: &[u8],
        head_only: bool,
        resp: &mut Vec<u8>,
    ) -> Result<Option<bool>, Fail> {
        if up.write_all(head).await.is_err() {
            return Ok(None);
        }
        resp.clear();
        let (len, body, reusable) = loop {
            if resp.capacity() - resp.len() < 4096 {
                resp.reserve(8192);
            }
            match up.read_buf(resp).await {
                Ok(0) | Err(_) if resp.is_empty() => return Ok(None),
                Ok(0) | Err(_) => return Err(Fail::Reject(BAD_GATEWAY)),
                Ok(_) => {}
            }
            if let Some(parsed) = parse_response(resp, head_only)? {
                break parsed;
            }
            if resp.len() > MAX_HEAD {
                return Err(Fail::Reject(BAD_GATEWAY));
            }
        };
        // `resp` holds what is not yet written to the client; `flushed` what already is.
        let mut flushed = 0;
        let mut chunk_pos = len;
        loop {
            let done = match body {
                Body::None => true,
                Body::Length(n) => flushed + resp.len() >= len + n,
                Body::Chunked => scan_chunks(resp, &mut chunk_pos)?.is_some(),
            };
            if done {
                break;
            }
            if resp.len() >= FLUSH_AT {
                // Keep the unscanned tail of a chunked body; send everything before it.
                let keep = match body {
                    Body::Chunked => chunk_pos,
                    _ => resp.len(),
                };
                client.write_all(&resp[..keep]).await?;
                flushed += keep;
                resp.drain(..keep);
                chunk_pos = 0;
            }
            if resp.capacity() - resp.len() < 4096 {
                resp.reserve(16384);
            }
            if up.read_buf(resp).await? == 0 {
                return Err(Fail::Io);
            }
        }
        client.write_all(resp).await?;
        client.flush().await?;
        Ok(Some(reusable))
    }
}

#[async_trait]
impl ServerApp for Forwarder {
    async fn process_new(
        self: &Arc<Self>,
        mut client: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Both buffers live for the connection: no allocation per request in steady state.
        let mut req = Vec::with_capacity(4096);
        let mut resp = Vec::with_capacity(16384);
        loop {
            let result = self.serve_one(&mut client, &mut req, &mut resp).await;
            match result {
                Ok(true) if !*shutdown.borrow() => continue,
                Ok(_) | Err(Fail::Io) => return None,
                Err(Fail::Reject(answer)) => {
                    let _ = client.write_all(answer).await;
                    let _ = client.flush().await;
                    return None;
                }
            }
        }
    }
}

impl Forwarder {
    /// Reads one request head, forwards it and its answer; `Ok(true)` keeps the client.
    async fn serve_one(
        &self,
        client: &mut Stream,
        req: &mut Vec<u8>,
        resp: &mut Vec<u8>,
    ) -> Result<bool, Fail> {
        let head = loop {
            if !req.is_empty() {
                if let Some(head) = parse_request(req)? {
                    break head;
                }
                if req.len() > MAX_HEAD {
                    return Err(Fail::Reject(BAD_REQUEST));
                }
            }
            if req.capacity() - req.len() < 1024 {
                req.reserve(4096);
            }
            if client.read_buf(req).await? == 0 {
                return Err(Fail::Io);
            }
        };
        let bytes = &req[..head.len];
        let mut reused = true;
        let mut up = match pooled() {
            Some(up) => up,
            None => {
                reused = false;
                self.connect()
                    .await
                    .map_err(|_| Fail::Reject(BAD_GATEWAY))?
            }
        };
        let reusable = loop {
            match self
                .exchange(client, &mut up, bytes, head.head_only, resp)
                .await?
            {
                Some(reusable) => break reusable,
                // Safe to repeat: only GET/HEAD without a body come this far.
                None if reused => {
                    reused = false;
                    up = self
                        .connect()
                        .await
                        .map_err(|_| Fail::Reject(BAD_GATEWAY))?;
                }
                None => return Err(Fail::Reject(BAD_GATEWAY)),
            }
        };
        if reusable {
            release(up);
        }
        // Pipelined bytes after this head stay for the next round.
        req.drain(..head.len);
        Ok(head.keep_alive)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: lean_forwarder LISTEN_ADDR UPSTREAM_ADDR THREADS");
        std::process::exit(2);
    }
    let upstream: SocketAddr = args[2].parse().expect("UPSTREAM_ADDR: host:port");
    let threads: usize = args[3].parse().expect("THREADS: a number");
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    // Workers as cutover-proxy runs them: one single-threaded service per thread, each with its
    // own SO_REUSEPORT socket on the port (the leading zeros keep Pingora's listener addresses
    // distinct; they parse to the same port).
    let (host, port) = args[1].rsplit_once(':').expect("LISTEN_ADDR: host:port");
    for i in 0..threads.max(1) {
        let mut service = Service::new(format!("lean-{i}"), Forwarder { upstream });
        service.threads = Some(1);
        let mut socket = TcpSocketOptions::default();
        socket.so_reuseport = Some(true);
        service.add_listener(
            ListenerConfig::tcp(format!("{host}:{}{port}", "0".repeat(i)))
                .tcp_socket_options(socket)
                .l4_buffer(L4BufferSettings::default().read(0)),
        );
        server.add_service(service);
    }
    server.run_forever();
}
