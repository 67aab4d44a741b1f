//! Runs Cloudflare's official Python SDK (PyPI `cloudflare`, pinned in the workspace's
//! `tests/python/requirements.txt`) against the `cfq-emulator` binary (the same server as
//! `cfq-bridge emulator`): push, bulk push, pull, ack and retry must work unchanged with
//! the documented results.
//!
//! Needs `python3` with the SDK installed: `pip install -r tests/python/requirements.txt`.
//! Without them this test fails and says so.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Kills the emulator process when the test ends, passed or failed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python_with_sdk() {
    let probe = Command::new("python3")
        .args(["-c", "import cloudflare; print(cloudflare.__version__)"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "python3 is not available ({e}); install Python 3, then \
                 `pip install -r tests/python/requirements.txt`"
            )
        });
    assert!(
        probe.status.success(),
        "the Python module `cloudflare` is missing: run \
         `pip install -r tests/python/requirements.txt`\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

#[test]
fn the_official_python_sdk_works_against_the_emulator() {
    python_with_sdk();
    let token = "sdk-check-token";
    let mut child = Command::new(env!("CARGO_BIN_EXE_cfq-emulator"))
        .args(["--port", "0", "--token", token])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the cfq-emulator binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let _guard = KillOnDrop(child);

    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the emulator prints its address");
    let base_url = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|url| url.starts_with("http://"))
        .unwrap_or_else(|| panic!("unexpected first line from the emulator: {line:?}"))
        .to_owned();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/sdk_check.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(&base_url)
        .arg(token)
        .output()
        .expect("python3 runs the SDK check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK check failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("0 failed"), "{stdout}");
}
