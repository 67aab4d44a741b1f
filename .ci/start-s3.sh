#!/usr/bin/env bash
# Makes an S3-compatible server answer on 127.0.0.1:9014 for the `s3` sink's tests
# (tests/s3_sink.rs). Idempotent: installs the server only when it is missing, and starts
# it only when nothing answers on the port.
#
# The server is s3s-fs (crates.io, `cargo install s3s-fs --features binary`): a real S3
# HTTP server (the s3s crate: SigV4 authentication, S3 XML errors such as NoSuchBucket and
# SignatureDoesNotMatch) that stores each bucket as a directory and each object as a file.
# Chosen because it installs from crates.io with the toolchain CI already has (about 3 to
# 4 minutes of compiling on 2 cores, measured: 191 s while other builds ran), needs no
# prebuilt download, starts in milliseconds, and can be stopped and restarted on the same
# directory, which the outage test does with a private instance. RustFS and MinIO are not
# installable from a registry here; the PyPI servers (moto) are mocks of AWS rather than
# storage servers.
#
# Buckets are directories under the root: `mkdir "$S3_ROOT/NAME"` creates one.
#
# Environment (all optional):
#   S3_PORT            port to listen on (default 9014)
#   S3_ROOT            data directory (default /tmp/cfq-s3)
#   S3_ACCESS_KEY      access key the server accepts (default cfq-test-key)
#   S3_SECRET_KEY      secret key the server accepts (default cfq-test-secret)
#   S3S_FS_VERSION     crate version to install (default 0.14.1, the last for Rust < 1.96)
#   S3S_FS_LOG         server log file (default /tmp/s3s-fs.log)
#   S3_READY_SECS      how long to wait for the server (default 30)
set -euo pipefail

port="${S3_PORT:-9014}"
root="${S3_ROOT:-/tmp/cfq-s3}"
access_key="${S3_ACCESS_KEY:-cfq-test-key}"
secret_key="${S3_SECRET_KEY:-cfq-test-secret}"
version="${S3S_FS_VERSION:-0.14.1}"
log="${S3S_FS_LOG:-/tmp/s3s-fs.log}"
ready_secs="${S3_READY_SECS:-30}"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

answers() {
  # True when something accepts TCP connections on 127.0.0.1:$port.
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

mkdir -p "$root"

if answers; then
  echo "start-s3: a server already answers on 127.0.0.1:$port"
  exit 0
fi

if ! command -v s3s-fs >/dev/null 2>&1; then
  echo "start-s3: installing s3s-fs $version (a few minutes)"
  start=$SECONDS
  cargo install s3s-fs --locked --version "$version" --features binary
  echo "start-s3: installed s3s-fs in $((SECONDS - start)) s"
fi

echo "start-s3: starting s3s-fs on 127.0.0.1:$port (root: $root, log: $log)"
# The keys are test values for a local server, not secrets.
nohup s3s-fs --host 127.0.0.1 --port "$port" \
  --access-key "$access_key" --secret-key "$secret_key" "$root" \
  >"$log" 2>&1 </dev/null &
pid=$!

deadline=$((SECONDS + ready_secs))
until answers; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "start-s3: s3s-fs exited; last log lines:" >&2
    tail -n 20 "$log" >&2 || true
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    echo "start-s3: s3s-fs (pid $pid) did not answer on port $port within ${ready_secs}s" >&2
    tail -n 20 "$log" >&2 || true
    exit 1
  fi
  sleep 0.1
done
echo "start-s3: s3s-fs ready on 127.0.0.1:$port (pid $pid)"
