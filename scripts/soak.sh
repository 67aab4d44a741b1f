#!/usr/bin/env bash
# Soak run of cfq-bridge (not part of CI): 10,000,000 messages by default across API faults,
# a bad network, SIGKILLed bridges, a restarted NATS server and a full disk. See
# scripts/soak.py for what it does and checks, docs/reliability.md ("Soak run") for figures.
#
#   scripts/soak.sh                        # 10,000,000 messages (about an hour or more)
#   scripts/soak.sh --messages 200000      # a short rehearsal
#   scripts/soak.sh --help                 # every option
#
# Needs: root (it mounts a tmpfs for the JSONL archive), python3, nats-server on the PATH
# (or --nats-server PATH) and a release build of the bridge (built here if missing). The
# Python side uses the standard library only. Exit 0: nothing lost; 1: a loss or a
# failed check; 2: the run could not be set up or did not finish in --max-minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "soak.sh: must run as root (it mounts a tmpfs)" >&2
  exit 2
fi
command -v python3 >/dev/null || { echo "soak.sh: python3 is missing" >&2; exit 2; }
if ! command -v nats-server >/dev/null && [[ ! -x /usr/sbin/nats-server ]]; then
  echo "soak.sh: nats-server not found (apt-get install nats-server)" >&2
  exit 2
fi
if [[ ! -x target/release/cfq-bridge ]]; then
  cargo build --release --bin cfq-bridge
fi
exec python3 scripts/soak.py "$@"
