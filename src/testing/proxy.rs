//! A fault-injecting TCP proxy for loopback tests: put it between clients and an etcd member and
//! switch, at run time, between passing bytes through, cutting every connection, swallowing
//! bytes (a blackhole) and delaying them.
//!
//! The proxy forwards raw TCP, so it works for plain and TLS endpoints alike. Each accepted
//! connection gets one task that owns both sockets; dropping the [`Proxy`] stops the listener
//! and every connection task.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use etcd_coord::testing::proxy::{Mode, Proxy};
//! use etcd_coord::testing::EtcdCluster;
//!
//! let etcd = EtcdCluster::single().await?;
//! let proxy = Proxy::start(etcd.endpoint(0)).await?;
//! let client = etcd_coord::connect([proxy.url()]).await?;
//! proxy.set_mode(Mode::Cut); // the client is cut off from etcd ...
//! proxy.set_mode(Mode::Latency(Duration::from_millis(50))); // ... then slow ...
//! proxy.set_mode(Mode::Pass); // ... then healed
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Bytes read per chunk; each chunk is forwarded (or delayed) as a unit.
const CHUNK: usize = 16 * 1024;
/// Chunks read ahead of the writer per direction. Beyond this the reader stops reading, so a
/// blackholed connection pushes back on its sender like a real stalled peer.
const READ_AHEAD: usize = 16;
/// Pause between attempts to listen again on the proxy's port after a cut.
const REBIND_RETRY: Duration = Duration::from_millis(20);

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Forwards bytes both ways as they come.
    #[default]
    Pass,
    /// Closes every open connection and refuses new ones (the port is not listened on), like a
    /// crashed member or a host that is down.
    Cut,
    /// Accepts connections but forwards nothing, in either direction, until the mode changes:
    /// like a partition or a hung host. Bytes already read are delivered once traffic flows
    /// again (TCP retransmission after a healed partition).
    Blackhole,
    /// Forwards every chunk after this delay, in each direction (a round trip gains twice the
    /// delay). Order is kept.
    Latency(Duration),
}

/// A TCP proxy on `127.0.0.1` in front of one loopback upstream; see the [module docs](self).
///
/// Dropping it closes the listener and every connection.
pub struct Proxy {
    addr: SocketAddr,
    scheme: &'static str,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    open: Arc<AtomicUsize>,
    _stop: DropGuard,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("mode", &self.mode())
            .finish()
    }
}

impl Proxy {
    /// Starts a proxy in [`Mode::Pass`] on a free loopback port, forwarding to `upstream`:
    /// `host:port`, `http://host:port` or `https://host:port`, which must resolve to a loopback
    /// address.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an upstream that is not a loopback `host:port`; the error of binding
    /// the listener otherwise.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let proxy = etcd_coord::testing::proxy::Proxy::start("http://127.0.0.1:2379").await?;
    /// println!("connect to {}", proxy.url());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(upstream: impl AsRef<str>) -> io::Result<Proxy> {
        let raw = upstream.as_ref().trim();
        let (scheme, authority) = match raw.split_once("://") {
            Some(("https", rest)) => ("https", rest),
            Some((_, rest)) => ("http", rest),
            None => ("http", raw),
        };
        let authority = authority.trim_end_matches('/');
        let invalid = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("proxy upstream {raw:?}: {why}"),
            )
        };
        let upstream = authority
            .to_socket_addrs()
            .map_err(|e| invalid(&e.to_string()))?
            .find(|a| a.ip().is_loopback())
            .ok_or_else(|| invalid("not a loopback address"))?;
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let stop = CancellationToken::new();
        let open = Arc::new(AtomicUsize::new(0));
        tokio::spawn(accept_loop(
            listener,
            addr,
            upstream,
            mode_rx,
            stop.clone(),
            open.clone(),
        ));
        tracing::debug!(%addr, %upstream, "proxy started");
        Ok(Proxy {
            addr,
            scheme,
            upstream,
            mode,
            open,
            _stop: stop.drop_guard(),
        })
    }

    /// The address clients connect to.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(proxy: etcd_coord::testing::proxy::Proxy) {
    /// assert!(proxy.addr().ip().is_loopback());
    /// # }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's endpoint URL, with the upstream's scheme (`http` unless the upstream was
    /// given as `https://...`).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(proxy: etcd_coord::testing::proxy::Proxy) {
    /// let client = etcd_coord::connect([proxy.url()]).await;
    /// # }
    /// ```
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Switches the mode; it applies to open connections and new ones at once.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(proxy: etcd_coord::testing::proxy::Proxy) {
    /// use etcd_coord::testing::proxy::Mode;
    /// proxy.set_mode(Mode::Blackhole);
    /// proxy.set_mode(Mode::Pass);
    /// # }
    /// ```
    pub fn set_mode(&self, mode: Mode) {
        let old = self.mode.send_replace(mode);
        tracing::debug!(addr = %self.addr, ?old, new = ?mode, "proxy mode changed");
    }

    /// The current mode.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(proxy: etcd_coord::testing::proxy::Proxy) {
    /// assert_eq!(proxy.mode(), etcd_coord::testing::proxy::Mode::Pass);
    /// # }
    /// ```
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// How many client connections are open through the proxy now.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(proxy: etcd_coord::testing::proxy::Proxy) {
    /// proxy.set_mode(etcd_coord::testing::proxy::Mode::Cut);
    /// // shortly after: proxy.connections() == 0
    /// # }
    /// ```
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// A listener with `SO_REUSEADDR`, so that the port can be listened on again right after a cut
/// even while closed connections linger in `TIME_WAIT`.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    stop: CancellationToken,
    open: Arc<AtomicUsize>,
) {
    let mut listener = Some(listener);
    loop {
        let current = *mode.borrow_and_update();
        if current == Mode::Cut {
            // Not listening is what makes new connections fail with "connection refused".
            listener = None;
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = mode.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let Some(active) = listener.as_ref() else {
            match listen(addr) {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "proxy cannot listen again yet; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(REBIND_RETRY) => {}
                    }
                }
            }
            continue;
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = mode.changed() => if changed.is_err() { return },
            accepted = active.accept() => match accepted {
                Ok((client, peer)) => {
                    tracing::trace!(%addr, %peer, "proxy accepted a connection");
                    tokio::spawn(connection(client, upstream, mode.clone(), stop.clone(), open.clone()));
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "proxy accept failed");
                    tokio::time::sleep(REBIND_RETRY).await;
                }
            },
        }
    }
}

/// Decrements the open-connection count however the connection task ends.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    stop: CancellationToken,
    open: Arc<AtomicUsize>,
) {
    open.fetch_add(1, Ordering::Relaxed);
    let _counted = Counted(open);
    // An upstream that is down closes the client's connection, as the member itself would.
    let server = tokio::select! {
        _ = stop.cancelled() => return,
        s = TcpStream::connect(upstream) => match s {
            Ok(s) => s,
            Err(e) => {
                tracing::trace!(%upstream, error = %e, "proxy cannot reach the upstream");
                return;
            }
        },
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut cut = mode.clone();
    // Whichever side closes first ends the connection: gRPC never half-closes TCP.
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = cut.wait_for(|m| *m == Mode::Cut) => {}
        _ = pipe(client_read, server_write, mode.clone()) => {}
        _ = pipe(server_read, client_write, mode) => {}
    }
}

/// Copies one direction, chunk by chunk, obeying the mode for each chunk.
async fn pipe<R, W>(mut from: R, mut to: W, mut mode: watch::Receiver<Mode>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(READ_AHEAD);
    let read = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((read_at, chunk)) = rx.recv().await {
            loop {
                let current = *mode.borrow_and_update();
                match current {
                    Mode::Pass => break,
                    Mode::Cut => return,
                    Mode::Blackhole => {
                        if mode.changed().await.is_err() {
                            return;
                        }
                    }
                    Mode::Latency(delay) => tokio::select! {
                        _ = tokio::time::sleep_until(read_at + delay) => break,
                        changed = mode.changed() => if changed.is_err() { return },
                    },
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The writer finishing (peer gone, cut) ends the direction; so does the reader reaching
    // EOF, once everything it read has been written.
    tokio::pin!(write);
    tokio::select! {
        _ = read => { let _ = (&mut write).await; }
        _ = &mut write => {}
    }
}
