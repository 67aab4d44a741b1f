//! A private nats-server for tests that must stop and restart their server (outages),
//! so the shared server on 127.0.0.1:4222 is never touched.
//!
//! Runs the same binary as the shared server (`/usr/sbin/nats-server`, or `$NATS_SERVER_BIN`)
//! with JetStream and its own store directory. At its first start the server chooses its
//! port (`-p -1`) and writes it to a ports file, which is read back. Stopping kills the
//! process (as a crash would); restarting reuses that port and the store, as a restarted
//! server does in production, so clients reconnect to the URL they had and what JetStream
//! stored is there again.
//!
//! Part of `tests/common`; the benches include it by path (`benches/support/mod.rs`).

#![allow(dead_code)]

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
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
    /// Holds the store (`store/`) and the ports file the server writes.
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a port of its choosing with a fresh store directory, and waits
    /// until it answers.
    pub fn start() -> NatsServer {
        NatsServer::start_with_args(&[])
    }

    /// Like [`NatsServer::start`], with extra command-line options (for example
    /// `--user u --pass p`).
    pub fn start_with_args(args: &[&str]) -> NatsServer {
        let dir = tempfile::tempdir().expect("temp store dir");
        let mut server = NatsServer {
            port: 0,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server.port = server.chosen_port();
        server.wait_answering();
        server
    }

    /// Reads the port the first process chose from its ports file
    /// (`nats-server_<pid>.ports`, JSON `{"nats":["nats://127.0.0.1:PORT"]}`).
    fn chosen_port(&mut self) -> u16 {
        let pid = self.child.as_ref().expect("spawned").id();
        let file = self.dir.path().join(format!("nats-server_{pid}.ports"));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(port) = read_ports_file(&file) {
                return port;
            }
            self.assert_alive("at start");
            assert!(
                Instant::now() < deadline,
                "nats-server wrote no ports file {} within 15 s",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
        self.spawn();
        self.wait_answering();
    }

    /// Spawns the process: on the chosen port once there is one, else on a port it picks.
    fn spawn(&mut self) {
        let bin = binary();
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(self.dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(self.dir.path())
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
    }

    /// Panics when the process has exited (for example: the port was taken meanwhile).
    fn assert_alive(&mut self, when: &str) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nats-server (port {}) exited {when}: {status}", self.port);
            }
        }
    }

    /// Waits until the server greets on its port, failing early if it exited.
    fn wait_answering(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !answers(self.port) {
            self.assert_alive("at start");
            assert!(
                Instant::now() < deadline,
                "nats-server on port {} did not answer within 15 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The client port in a nats-server ports file, once the file is complete.
fn read_ports_file(path: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = value["nats"].get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
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
