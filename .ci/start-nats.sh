#!/usr/bin/env bash
# Makes sure a NATS server with JetStream answers on 127.0.0.1:4222 (for the real-server
# tests). Idempotent: does nothing when one already answers; otherwise installs the Debian
# package nats-server if /usr/sbin/nats-server is missing, starts it in the background and
# waits until it answers.
set -euo pipefail

HOST=127.0.0.1
PORT=${NATS_PORT:-4222}
BIN=/usr/sbin/nats-server
STORE=${NATS_STORE:-/var/lib/nats-server}
# The pid file ties "already running" to this server, not to any nats-server process
# (tests run private ones on other ports).
PIDFILE=/run/cfq-nats-server-$PORT.pid

answers() {
    # A NATS server greets every new connection with an INFO line.
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT && head -c 4 <&3" 2>/dev/null | grep -q INFO
}

if answers; then
    echo "start-nats: a NATS server already answers on $HOST:$PORT"
    exit 0
fi

if [ ! -x "$BIN" ]; then
    echo "start-nats: installing the Debian package nats-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq nats-server >/dev/null
fi

mkdir -p "$STORE"
start-stop-daemon --start --oknodo --background --make-pidfile --pidfile "$PIDFILE" \
    --exec "$BIN" -- \
    -a "$HOST" -p "$PORT" -js -sd "$STORE"

for _ in $(seq 1 100); do
    if answers; then
        echo "start-nats: nats-server with JetStream answers on $HOST:$PORT"
        exit 0
    fi
    sleep 0.1
done
echo "start-nats: nats-server did not answer on $HOST:$PORT within 10 s" >&2
exit 1
