//! A TCP proxy for tests that simulates network outages: it forwards connections to a
//! target until it is cut, then closes every open connection and drops each new one at
//! once, until it is restored.
//! Part of `tests/common`; its own test is in `tests/kafka_outage.rs`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy on `127.0.0.1:<ephemeral port>`. Stops when dropped.
pub struct TcpProxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    accepted: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
    accept_task: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy forwarding to `target`, listening on an ephemeral loopback port.
    pub async fn start(target: SocketAddr) -> io::Result<TcpProxy> {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await?, target)
    }

    /// Starts a proxy forwarding to `target` that accepts on `listener` (bound by the
    /// caller, which keeps the port from the start).
    pub fn start_on(listener: TcpListener, target: SocketAddr) -> io::Result<TcpProxy> {
        let addr = listener.local_addr()?;
        let (open, open_rx) = watch::channel(true);
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let live = Arc::new(AtomicUsize::new(0));
        let live_in_task = Arc::clone(&live);
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !*open_rx.borrow() {
                    // Cut: the client sees its connection closed immediately.
                    drop(client);
                    continue;
                }
                counter.fetch_add(1, Ordering::Relaxed);
                live_in_task.fetch_add(1, Ordering::SeqCst);
                let live = Arc::clone(&live_in_task);
                let open = open_rx.clone();
                tokio::spawn(async move {
                    forward(client, target, open).await;
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(TcpProxy {
            addr,
            open,
            accepted,
            live,
            accept_task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every forwarded connection and drops new ones until [`TcpProxy::restore`].
    /// Returns once every forwarded connection is closed.
    pub async fn cut(&self) {
        self.open.send_replace(false);
        while self.live.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }

    /// True while connections are forwarded.
    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// How many connections were forwarded so far.
    pub fn forwarded_connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.open.send_replace(false);
        self.accept_task.abort();
    }
}

/// Copies bytes both ways until either side closes or the proxy is cut; dropping both
/// sockets then closes them.
async fn forward(mut client: TcpStream, target: SocketAddr, mut open: watch::Receiver<bool>) {
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = open.wait_for(|open| !*open) => {}
    }
}
