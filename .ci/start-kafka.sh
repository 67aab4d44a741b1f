#!/usr/bin/env bash
# Makes a Kafka-protocol broker (tansu, in-memory storage) answer on 127.0.0.1:9092 for the
# real-broker tests. Idempotent: installs tansu only when the installed one lacks the
# dynostore storage engine, and starts the broker only when nothing answers on the port.
#
# Environment (all optional):
#   KAFKA_PORT        port to listen on (default 9092)
#   TANSU_VERSION     crate version to install (default 0.6.0)
#   TANSU_LOG         broker log file (default /tmp/tansu-broker.log)
#   TANSU_READY_SECS  how long to wait for the broker (default 30)
set -euo pipefail

port="${KAFKA_PORT:-9092}"
version="${TANSU_VERSION:-0.6.0}"
log="${TANSU_LOG:-/tmp/tansu-broker.log}"
ready_secs="${TANSU_READY_SECS:-30}"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

answers() {
  # True when something accepts TCP connections on 127.0.0.1:$port.
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

if answers; then
  echo "start-kafka: a broker already answers on 127.0.0.1:$port"
  exit 0
fi

# The default features of tansu have no usable storage engine: dynostore is required.
if ! tansu --help 2>/dev/null | grep -q dynostore; then
  echo "start-kafka: installing tansu $version with dynostore (several minutes)"
  cargo install tansu --locked --version "$version" --features dynostore
fi

# tansu reads any .env file in its working directory: start it from an empty one.
workdir="$(mktemp -d /tmp/tansu-run.XXXXXX)"
echo "start-kafka: starting tansu on 127.0.0.1:$port (log: $log, dir: $workdir)"
(
  cd "$workdir"
  nohup tansu broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ \
    >"$log" 2>&1 </dev/null &
  echo $! >"$workdir/tansu.pid"
)
pid="$(cat "$workdir/tansu.pid")"

deadline=$((SECONDS + ready_secs))
until answers; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "start-kafka: tansu exited; last log lines:" >&2
    tail -n 20 "$log" >&2 || true
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    echo "start-kafka: tansu (pid $pid) did not answer on port $port within ${ready_secs}s" >&2
    tail -n 20 "$log" >&2 || true
    exit 1
  fi
  sleep 0.1
done
echo "start-kafka: tansu ready on 127.0.0.1:$port (pid $pid)"
