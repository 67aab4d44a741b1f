//! The S3-compatible server of the `s3` sink's tests: s3s-fs, installed and started on
//! 127.0.0.1:9014 by `.ci/start-s3.sh` (the shared server), or started privately on its
//! own port and directory by [`S3Server`] for tests that stop it.
//!
//! s3s-fs keeps each bucket as a directory under its root, so a test creates a bucket with
//! `mkdir` ([`create_bucket`]). Tests fail, not skip, when the server or its binary is
//! missing, with a message saying to run `.ci/start-s3.sh`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key the test servers accept (the default of `.ci/start-s3.sh`).
pub const ACCESS_KEY: &str = "cfq-test-key";
/// The secret key the test servers accept (a test value, not a secret).
pub const SECRET_KEY: &str = "cfq-test-secret";

/// The shared server's port (`S3_PORT`, default 9014).
pub fn shared_port() -> u16 {
    std::env::var("S3_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(9014)
}

/// The shared server's data directory (`S3_ROOT`, default /tmp/cfq-s3).
pub fn shared_root() -> PathBuf {
    std::env::var_os("S3_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/cfq-s3"))
}

/// The endpoint URL of a server on 127.0.0.1:`port`.
pub fn endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn answers(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}

/// Panics unless the shared server answers, saying how to start it.
pub fn require_shared_server() -> String {
    let port = shared_port();
    assert!(
        answers(port) && shared_root().is_dir(),
        "no S3 server on 127.0.0.1:{port} with its data in {}: run .ci/start-s3.sh",
        shared_root().display()
    );
    endpoint(port)
}

/// A bucket name unique to the calling test (lower case, as S3 wants).
pub fn unique_bucket(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000_000;
    format!("{tag}-{n}-{}", std::process::id())
}

/// Creates `bucket` on the server whose data lives in `root`.
pub fn create_bucket(root: &Path, bucket: &str) {
    std::fs::create_dir_all(root.join(bucket)).expect("create the bucket directory");
}

/// The `[sink]` table of an `s3` sink writing to `bucket` on `endpoint`, with `extra` lines.
pub fn sink_table(endpoint: &str, bucket: &str, extra: &str) -> String {
    format!(
        "type = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"cf/{{queue_id}}/\"\n\
         endpoint = \"{endpoint}\"\nallow_http = true\n{extra}"
    )
}

/// A private s3s-fs on its own port and directory, which a test may stop and restart.
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    root: tempfile::TempDir,
    log: PathBuf,
}

impl S3Server {
    /// Starts s3s-fs on a free port with a new data directory. Panics when the binary is
    /// missing, saying to run `.ci/start-s3.sh` (which installs it).
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().expect("server directory");
        let log = root.path().with_extension("log");
        let mut server = S3Server {
            child: None,
            port: super::reserve_port(),
            root,
            log,
        };
        server.restart();
        server
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        endpoint(self.port)
    }

    /// The data directory (buckets are its subdirectories).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Kills the server and waits until its port is closed.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while answers(self.port) {
            assert!(Instant::now() < deadline, "s3s-fs still answers after kill");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server (again) on the same port and directory, and waits until it
    /// answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let binary = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|home| home.join("bin/s3s-fs"))
            .filter(|path| path.exists())
            .unwrap_or_else(|| PathBuf::from("s3s-fs"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let child = Command::new(&binary)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run .ci/start-s3.sh, which installs s3s-fs",
                    binary.display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !answers(self.port) {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not answer on port {} within 30 s: {}",
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
