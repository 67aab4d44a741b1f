//! A TCP proxy for tests that simulates network outages: it forwards connections to a
//! target until it is cut, then closes every open connection and drops each new one at
//! once, until it is restored.
//!
//! Include it with `#[path = "common/tcp_proxy.rs"] mod tcp_proxy;`.

#![allow(dead_code)]

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
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Starts a proxy forwarding to `target`, listening on `listen`.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind(listen).await?;
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

#[cfg(test)]
mod proxy_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn proxy_forwards_cuts_and_restores() {
        let proxy = TcpProxy::start(echo_server().await).await.unwrap();
        let mut before = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut before).await.unwrap(), b"ping");

        proxy.cut().await;
        // The open connection is closed...
        assert!(round_trip(&mut before).await.is_err());
        // ...and a new one is dropped at once.
        let mut during = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut during).await.is_err());

        proxy.restore();
        let mut after = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut after).await.unwrap(), b"ping");
        assert_eq!(proxy.forwarded_connections(), 2);
    }
}
