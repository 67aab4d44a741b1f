//! A private nats-server for tests that must stop and restart their server (outages),
//! so the shared server on 127.0.0.1:4222 is never touched.
//!
//! Runs the same binary as the shared server (`/usr/sbin/nats-server`, or `$NATS_SERVER_BIN`)
//! with JetStream, on a free loopback port, with its own store directory. Stopping kills
//! the process (as a crash would); restarting reuses the port and the store, so what
//! JetStream had stored is there again.
//!
//! Include it with `#[path = "common/nats_server.rs"] mod nats_server;`.

#![allow(dead_code)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The address of the shared server the real-server tests use.
pub const SHARED_URL: &str = "nats://127.0.0.1:4222";

/// Fails with a clear message when the shared server on 127.0.0.1:4222 does not answer.
pub fn require_shared_server() {
    if !answers(4222) {
        panic!(
            "no NATS server answers on 127.0.0.1:4222; start one with `bash .ci/start-nats.sh` \
             (installs the Debian package nats-server if needed, runs it with JetStream)"
        );
    }
}

/// A private nats-server process.
pub struct NatsServer {
    port: u16,
    store: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port with a fresh store directory, and waits until it
    /// answers.
    pub fn start() -> NatsServer {
        NatsServer::start_with_args(&[])
    }

    /// Like [`NatsServer::start`], with extra command-line options (for example
    /// `--user u --pass p`).
    pub fn start_with_args(args: &[&str]) -> NatsServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("local addr").port();
        drop(listener);
        let store = tempfile::tempdir().expect("temp store dir");
        let mut server = NatsServer {
            port,
            store,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        server.restart();
        server
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the process (like a crash) and waits until the port no longer answers.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while answers(self.port) {
            assert!(
                Instant::now() < deadline,
                "nats-server on port {} did not stop",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the process again (same port, same store) and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let bin = binary();
        let child = Command::new(&bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}; install it with `bash .ci/start-nats.sh` \
                     (Debian package nats-server)",
                    bin.display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !answers(self.port) {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "nats-server on port {} exited at start: {status}",
                        self.port
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "nats-server on port {} did not answer within 15 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn binary() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"))
}

/// True when something on 127.0.0.1:`port` greets with a NATS `INFO` line.
pub fn answers(port: u16) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(1000)));
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).is_ok() && &buf == b"INFO"
}
