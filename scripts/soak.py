#!/usr/bin/env python3
"""Soak run of cfq-bridge: millions of messages across every kind of fault at once.

Not part of CI (it takes about an hour for 10,000,000 messages). Run it through
scripts/soak.sh, which checks the prerequisites; docs/reliability.md ("Soak run") gives the
figures of a full run.

What runs (all on 127.0.0.1, in a work directory of its own):

- `cfq-bridge emulator` with API faults: 5% HTTP 500, 2% HTTP 429 (Retry-After 1 s), 1%
  "applied then 500"; consumer max_retries 100 (nothing is dropped for being redelivered).
- scripts/soak_proxy.py between the bridges and the emulator: latency and jitter on every
  answer, stalled answers (some longer than the request timeout) and answers cut by a TCP
  RST in the middle.
- a private nats-server with JetStream, file storage in the work directory.
- two `cfq-bridge run` processes, both with the ack journal, on two queues of the emulator:
  queue `soak-nats` into NATS JetStream (stream SOAK, created by the bridge), queue
  `soak-jsonl` into a JSONL archive on a tmpfs mounted for the run (so needs root).

Messages are seeded in chunks while the run goes on, so the emulator never holds more than
about two chunks per queue. As the total number of acknowledged messages passes fixed
shares of the total, faults are injected: each bridge is SIGKILLed three times and
restarted; the NATS server is stopped (SIGTERM) and started again three times; the tmpfs
is filled until writes fail, left full for a while, then the filler file is deleted, three
times. A bridge that exits on its own is logged as a crash and restarted.

At each tenth of the run (each million for 10,000,000 messages) it records the VmRSS and
VmHWM of both bridges (and of the emulator and nats-server). At the end the bridges are
stopped with SIGTERM (a clean exit is expected), and it checks:

- the emulator: every seeded message acknowledged (acked = published = seeded, backlog 0,
  nothing in flight, dropped or dead-lettered, `never_acked_ids` empty);
- NATS: every seeded id of `soak-nats` is in the stream (read back through an ephemeral
  consumer, `Nats-Msg-Id` header), and nothing else;
- JSONL: every archive line parses, every seeded id of `soak-jsonl` is there, and
  nothing else;

and reports duplicates per destination. It exits 1 on any loss or check failure, 2 on a
setup error or timeout. The report (JSON and Markdown) is written to the work directory.
"""

import argparse
import asyncio
import errno
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ACCOUNT = "soak"
TOKEN = "soak-token"
QUEUE_NATS = "soak-nats"
QUEUE_JSONL = "soak-jsonl"
STREAM = "SOAK"
SUBJECT = "soak.events"
# Fault kinds that are outages, and the name their end carries in `pending`.
OUTAGE_OF = {"nats_restart": "nats_down", "disk_full": "disk_full"}
CONTENT_TYPES = ("json", "text", "bytes")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url, body=None, method=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def proc_status(pid):
    """VmRSS and VmHWM of a process, in KiB (None when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        return None
    return out


def scrape(port):
    """The bridge's Prometheus counters (name -> value), {} when unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except (OSError, urllib.error.URLError):
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        try:
            values[name] = float(value)
        except ValueError:
            pass
    return values


def counter_values(values):
    """Counter samples by short name: `cfq_messages_acked_total{route=..,queue_id=..}`
    becomes `messages_acked`; labels other than route and queue_id stay, as
    `api_errors{class="5xx"}`."""
    out = {}
    for sample, value in values.items():
        name, _, labels = sample.partition("{")
        if not (name.startswith("cfq_") and name.endswith("_total")):
            continue
        short = name[len("cfq_"):-len("_total")]
        extra = [l for l in labels.rstrip("}").split(",")
                 if l and not l.startswith(("route=", "queue_id="))]
        if extra:
            short += "{" + ",".join(extra) + "}"
        out[short] = out.get(short, 0) + value
    return out


def tail(path, lines=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class Bridge:
    """One `cfq-bridge run` on one queue, restartable; one log file per process."""

    def __init__(self, name, binary, config, workdir, metrics_port):
        self.name = name
        self.binary = binary
        self.config = config
        self.workdir = workdir
        self.metrics_port = metrics_port
        self.proc = None
        self.instance = 0
        self.started_at_acked = 0
        self.kills = 0
        self.crashes = []
        # Counters of the processes that are gone (last scrape before they died).
        self.counters_done = {}
        self.counters_live = {}
        self.log_path = None

    def start(self, acked_now):
        self.instance += 1
        self.log_path = os.path.join(self.workdir, "logs", f"{self.name}-{self.instance}.log")
        logf = open(self.log_path, "w")
        env = dict(os.environ, CLOUDFLARE_API_TOKEN=TOKEN, NO_COLOR="1")
        self.proc = subprocess.Popen(
            [self.binary, "run", "--config", self.config],
            stdout=logf, stderr=subprocess.STDOUT, env=env,
        )
        logf.close()
        self.started_at_acked = acked_now
        self.started_time = time.time()
        self.counters_live = {}
        log(f"{self.name}: started process {self.instance} (pid {self.proc.pid})")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def retire_counters(self):
        for k, v in self.counters_live.items():
            self.counters_done[k] = self.counters_done.get(k, 0) + v
        self.counters_live = {}

    def scrape(self):
        if self.alive():
            values = scrape(self.metrics_port)
            if values:
                self.counters_live = counter_values(values)

    def counters(self):
        total = dict(self.counters_done)
        for k, v in self.counters_live.items():
            total[k] = total.get(k, 0) + v
        return total

    def sigkill(self):
        self.scrape()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.retire_counters()
        self.kills += 1

    def stop(self, timeout=60):
        """SIGTERM; returns the exit code (None if it had to be killed)."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.scrape()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self.retire_counters()
        return code


class NatsStreamReader:
    """A minimal NATS client (standard library only) that reads a JetStream stream back.

    It creates an ephemeral pull consumer with `headers_only` and no acks, asks for
    batches with `$JS.API.CONSUMER.MSG.NEXT` and yields each message's `Nats-Msg-Id`.
    Written here because nats-py reads a few thousand messages per second on a busy
    machine, too slow for millions.
    """

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.buf = bytearray()
        self.pos = 0
        self.inbox = "_SOAK_INBOX." + os.urandom(8).hex()
        line = self._line()
        if not line.startswith(b"INFO"):
            raise RuntimeError(f"not a NATS server: {line[:80]!r}")
        self._send(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
                   b'"no_responders":true,"protocol":1}\r\nPING\r\n')
        self._send(f"SUB {self.inbox}.> 1\r\n".encode())

    def close(self):
        self.sock.close()

    def _send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        if self.pos > 1 << 20:
            del self.buf[:self.pos]
            self.pos = 0
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise RuntimeError("NATS connection closed")
        self.buf += chunk

    def _line(self):
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = bytes(self.buf[self.pos:end])
                self.pos = end + 2
                return line
            self._fill()

    def _take(self, n):
        while len(self.buf) - self.pos < n + 2:
            self._fill()
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n + 2
        return data

    def _next(self):
        """The next message as (subject, headers bytes or None, payload)."""
        while True:
            line = self._line()
            if line.startswith(b"HMSG"):
                parts = line.split()
                hdr_len, total = int(parts[-2]), int(parts[-1])
                block = self._take(total)
                return parts[1], block[:hdr_len], block[hdr_len:]
            if line.startswith(b"MSG"):
                parts = line.split()
                return parts[1], None, self._take(int(parts[-1]))
            if line == b"PING":
                self._send(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise RuntimeError(line.decode(errors="replace"))
            # PONG, +OK, INFO: nothing to do.

    def _request(self, subject, body):
        reply = f"{self.inbox}.r{os.urandom(4).hex()}"
        data = json.dumps(body).encode()
        self._send(f"PUB {subject} {reply} {len(data)}\r\n".encode() + data + b"\r\n")
        while True:
            subj, headers, payload = self._next()
            if subj.decode() == reply:
                if headers and b" 503" in headers.split(b"\r\n", 1)[0]:
                    raise RuntimeError(f"no responder for {subject}")
                return json.loads(payload)

    def stream_state(self, stream):
        info = self._request(f"$JS.API.STREAM.INFO.{stream}", {})
        if "error" in info:
            raise RuntimeError(f"stream info: {info['error']}")
        return info["state"]["messages"], info["state"]["bytes"]

    def read_all(self, stream, total):
        created = self._request(f"$JS.API.CONSUMER.CREATE.{stream}", {
            "stream_name": stream,
            "config": {"deliver_policy": "all", "ack_policy": "none", "headers_only": True,
                       "replay_policy": "instant", "inactive_threshold": 60_000_000_000},
        })
        if "error" in created:
            raise RuntimeError(f"creating a consumer: {created['error']}")
        name = created["name"]
        read = 0
        while read < total:
            reply = f"{self.inbox}.b{os.urandom(4).hex()}"
            want = min(20_000, total - read)
            body = json.dumps({"batch": want, "expires": 5_000_000_000}).encode()
            self._send(f"PUB $JS.API.CONSUMER.MSG.NEXT.{stream}.{name} {reply} "
                       f"{len(body)}\r\n".encode() + body + b"\r\n")
            got = 0
            while got < want:
                # Stream messages keep their own subject; status messages (404 no
                # messages, 408 request expired) come on the reply subject.
                subj, headers, _ = self._next()
                status = headers.split(b"\r\n", 1)[0] if headers else b""
                if len(status) > 9 and status[9:10].isdigit():
                    if subj.decode() == reply:
                        break
                    continue
                if headers is None:
                    continue
                got += 1
                read += 1
                mid = None
                at = headers.find(b"Nats-Msg-Id:")
                if at >= 0:
                    end = headers.find(b"\r\n", at)
                    mid = headers[at + 12:end].strip()
                yield mid
            if got == 0:
                raise RuntimeError(f"the stream gave nothing more after {read:,} of {total:,}")


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = args.workdir
        self.binary = args.binary
        self.target = {QUEUE_NATS: args.messages // 2, QUEUE_JSONL: args.messages - args.messages // 2}
        # The total actually run: smaller than --messages only when --seed-minutes cut it.
        self.messages = args.messages
        self.cut_short = None
        self.seeded = {QUEUE_NATS: 0, QUEUE_JSONL: 0}
        self.chunks = {QUEUE_NATS: 0, QUEUE_JSONL: 0}
        # id (16 bytes) -> copies found at the destination, per queue.
        self.expected = {QUEUE_NATS: {}, QUEUE_JSONL: {}}
        self.stats = {}
        self.events = []  # what happened, for the report
        self.pending = []  # (due time, description, callable)
        self.samples = []
        self.procs = {}
        self.bridges = {}
        self.mounted = False
        self.nats_proc = None
        self.nats_instance = 0
        self.outages = []
        self.started = None

    # ---------- setup ----------

    def setup(self):
        a = self.args
        if a.workdir_tmpfs_mb:
            # Everything the run writes (logs, NATS store, journals) on a tmpfs of its own:
            # another process filling the root filesystem cannot then fail the run.
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.workdir_tmpfs_mb}m", "tmpfs",
                            self.workdir], check=True)
            log(f"tmpfs of {a.workdir_tmpfs_mb} MiB mounted on {self.workdir} (umount it when done)")
        for sub in ("logs", "nats-store", "jsonl-disk", "state"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        self.disk = os.path.join(self.workdir, "jsonl-disk")
        # Room for the archive (with duplicates) and the journal, not much more: the
        # filler has less to write.
        size_mb = a.tmpfs_mb or max(64, int(self.target[QUEUE_JSONL] * 520 / 1e6) + 64)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", self.disk], check=True
        )
        self.mounted = True
        self.tmpfs_mb = size_mb
        log(f"tmpfs of {size_mb} MiB mounted on {self.disk}")

        self.emu_port = free_port()
        cmd = [
            self.binary, "emulator", "--port", str(self.emu_port), "--token", TOKEN,
            "--max-retries", "100",
            "--fault-500-rate", str(a.rate_500), "--fault-429-rate", str(a.rate_429),
            "--fault-retry-after-secs", "1",
            "--fault-applied-then-500-rate", str(a.rate_applied_500),
        ]
        self.procs["emulator"] = self.spawn("emulator", cmd)
        self.emu = f"http://127.0.0.1:{self.emu_port}"
        self.wait_for(lambda: http_json(self.emu + "/_emulator/health")["ok"], "the emulator")

        self.proxy_port = free_port()
        self.proxy_stats = os.path.join(self.workdir, "state", "proxy.json")
        cmd = [
            sys.executable, os.path.join(REPO, "scripts", "soak_proxy.py"),
            "--listen", f"127.0.0.1:{self.proxy_port}", "--target", f"127.0.0.1:{self.emu_port}",
            "--latency-ms", str(a.latency_ms), "--jitter-ms", str(a.jitter_ms),
            "--stall-rate", str(a.stall_rate), "--stall-min-ms", "2000", "--stall-max-ms", "8000",
            "--reset-rate", str(a.reset_rate), "--seed", str(self.rng.randrange(2**32)),
            "--stats-file", self.proxy_stats,
        ]
        self.procs["proxy"] = self.spawn("proxy", cmd)
        self.wait_for(lambda: socket.create_connection(("127.0.0.1", self.proxy_port), 1).close() or True,
                      "the proxy")

        self.nats_port = free_port()
        self.start_nats()

        base = f"http://127.0.0.1:{self.proxy_port}/client/v4"
        queue_common = (
            f'account_id = "{ACCOUNT}"\napi_base_url = "{base}"\n'
            "batch_size = 100\nvisibility_timeout_ms = 20000\nlease_margin_ms = 2000\n"
            "pullers = 4\nmax_in_flight = 2000\nrequest_timeout_ms = 4000\n"
            "retry_base_delay_secs = 1\nretry_max_delay_secs = 10\n"
            f"ack_concurrency = {self.args.ack_concurrency_toml}\n"
        )
        nats_cfg = (
            f'[queue]\nqueue_id = "{QUEUE_NATS}"\n{queue_common}'
            f'ack_journal = "{self.workdir}/state/nats-bridge.journal"\n\n'
            f'[sink]\ntype = "nats"\nurl = "nats://127.0.0.1:{self.nats_port}"\n'
            f'subject = "{SUBJECT}"\npublish_timeout_ms = 5000\n\n'
            f'[sink.create_stream]\nname = "{STREAM}"\nsubjects = ["soak.>"]\n'
            'duplicate_window_secs = 600\nstorage = "file"\n\n'
        )
        jsonl_cfg = (
            f'[queue]\nqueue_id = "{QUEUE_JSONL}"\n{queue_common}'
            f'ack_journal = "{self.disk}/acks.journal"\n\n'
            f'[sink]\ntype = "jsonl"\npath = "{self.disk}/archive.jsonl"\n\n'
        )
        for name, queue, text in (("nats-bridge", QUEUE_NATS, nats_cfg),
                                  ("jsonl-bridge", QUEUE_JSONL, jsonl_cfg)):
            port = free_port()
            path = os.path.join(self.workdir, f"{name}.toml")
            with open(path, "w") as f:
                f.write(text + f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
            self.bridges[queue] = Bridge(name, self.binary, path, self.workdir, port)

    def spawn(self, name, cmd):
        logf = open(os.path.join(self.workdir, "logs", f"{name}.log"), "w")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        return proc

    def wait_for(self, probe, what, timeout=30):
        deadline = time.time() + timeout
        while True:
            try:
                if probe():
                    return
            except Exception:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not come up")
            time.sleep(0.1)

    def start_nats(self):
        self.nats_instance += 1
        cmd = [
            self.args.nats_server, "-a", "127.0.0.1", "-p", str(self.nats_port), "-js",
            "-sd", os.path.join(self.workdir, "nats-store"),
        ]
        self.nats_proc = self.spawn(f"nats-server-{self.nats_instance}", cmd)
        self.wait_for(lambda: socket.create_connection(("127.0.0.1", self.nats_port), 1).close() or True,
                      "nats-server")

    # ---------- the run ----------

    def queue_stats(self, queue):
        s = http_json(f"{self.emu}/_emulator/stats/{ACCOUNT}/{queue}")
        s["never_acked_count"] = len(s.pop("never_acked_ids", []))
        return s

    def total_acked(self):
        return sum(self.stats[q]["acked"] for q in self.target)

    def seed_if_low(self):
        a = self.args
        if (a.seed_minutes and self.cut_short is None
                and time.time() - self.started > a.seed_minutes * 60
                and sum(self.seeded.values()) < self.messages):
            # Out of time: what is seeded becomes the whole run; it is drained and checked.
            self.cut_short = sum(self.seeded.values())
            for queue in self.target:
                self.target[queue] = self.seeded[queue]
            self.messages = self.cut_short
            self.event("seeding_stopped", after_minutes=a.seed_minutes, messages=self.messages)
        for queue, target in self.target.items():
            st = self.stats[queue]
            if self.seeded[queue] >= target:
                continue
            if st["published"] - st["acked"] >= a.chunk:
                continue
            count = min(a.chunk, target - self.seeded[queue])
            ctype = CONTENT_TYPES[self.chunks[queue] % len(CONTENT_TYPES)]
            answer = http_json(self.emu + "/_emulator/seed", {
                "account_id": ACCOUNT, "queue_id": queue, "count": count,
                "body_size": a.body_size, "content_type": ctype, "return_ids": True,
            }, timeout=300)
            ids = answer["ids"]
            if len(ids) != count:
                raise RuntimeError(f"seeded {len(ids)} instead of {count}")
            expected = self.expected[queue]
            for i in ids:
                expected[bytes.fromhex(i)] = 0
            self.seeded[queue] += count
            self.chunks[queue] += 1
            st["published"] += count

    def plan(self):
        """Fault points as shares of the total acknowledged, with a little jitter."""
        j = lambda x: x + self.rng.uniform(-0.02, 0.02)
        plan = []
        for share in (0.07, 0.22, 0.37):
            plan.append((j(share), "kill", QUEUE_NATS))
        for share in (0.12, 0.27, 0.42):
            plan.append((j(share), "kill", QUEUE_JSONL))
        for share in (0.17, 0.52, 0.80):
            plan.append((j(share), "nats_restart", None))
        for share in (0.32, 0.64, 0.90):
            plan.append((j(share), "disk_full", None))
        plan.sort()
        return plan

    def event(self, what, **fields):
        entry = {"t": round(time.time() - self.started, 1), "acked": self.total_acked(), "event": what}
        entry.update(fields)
        self.events.append(entry)
        log(f"EVENT {what} {fields} (acked {entry['acked']})")

    def do_kill(self, queue):
        bridge = self.bridges[queue]
        if not bridge.alive():
            self.event("kill_skipped_not_running", bridge=bridge.name)
            return
        # A random extra moment so the kill lands anywhere in the cycle.
        time.sleep(self.rng.uniform(0, 1.0))
        st = self.queue_stats(queue)
        bridge.sigkill()
        self.event("sigkill", bridge=bridge.name, queue_acked=st["acked"], in_flight=st["in_flight"])
        delay = self.rng.uniform(0.5, 3.0)
        self.pending.append((time.time() + delay, f"restart {bridge.name}",
                             lambda: self.restart(queue)))

    def restart(self, queue):
        self.bridges[queue].start(self.stats[queue]["acked"])
        self.event("restart", bridge=self.bridges[queue].name)

    def watch_outage(self, queue, kind, hold, end_action):
        """Acks of `queue` during an outage: fresh count at its start, after a settling
        time (batches the destination confirmed before the outage may still be acked
        then), and at its end. After settling, nothing new should be acknowledged."""
        at_start = self.queue_stats(queue)["acked"]
        settle = min(self.args.settle_secs, hold / 2)
        marks = {}

        def archive_size():
            try:
                return os.path.getsize(os.path.join(self.disk, "archive.jsonl"))
            except OSError:
                return 0

        size_at_start = archive_size()

        def settled():
            marks["settled"] = self.queue_stats(queue)["acked"]
            marks["size_settled"] = archive_size()

        def end():
            at_end = self.queue_stats(queue)["acked"]
            size_at_end = archive_size()
            end_action()
            settled_at = marks.get("settled", at_start)
            entry = {"kind": kind, "queue": queue, "hold_s": hold, "settle_s": settle,
                     "acked_while_settling": settled_at - at_start,
                     "acked_after_settling": at_end - settled_at}
            if queue == QUEUE_JSONL:
                # Rolled-back writes free space on the full disk, so a few later writes
                # can succeed (and be acked, legitimately): the archive then grows.
                entry["archive_growth_while_settling"] = marks.get("size_settled", 0) - size_at_start
                entry["archive_growth_after_settling"] = size_at_end - marks.get("size_settled", 0)
            self.outages.append(entry)
            self.event(f"{kind}_over", **{k: v for k, v in entry.items()
                                          if k.startswith(("acked", "archive"))})

        now = time.time()
        self.pending.append((now + settle, f"{kind} settled", settled))
        self.pending.append((now + hold, f"{kind} over", end))
        return at_start

    def do_nats_restart(self):
        self.nats_proc.send_signal(signal.SIGTERM)
        try:
            self.nats_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.nats_proc.kill()
            self.nats_proc.wait()
        acked = self.watch_outage(QUEUE_NATS, "nats_down", self.args.nats_down_secs,
                                  self.start_nats)
        self.event("nats_stopped", queue_acked=acked)

    def do_disk_full(self):
        filler = os.path.join(self.disk, "filler")
        written = 0
        with open(filler, "wb", buffering=0) as f:
            for block in (1 << 20, 4096, 1):
                data = b"\0" * block
                while True:
                    try:
                        n = f.write(data)
                        written += n
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
        free = shutil.disk_usage(self.disk).free
        acked = self.watch_outage(QUEUE_JSONL, "disk_full", self.args.disk_full_secs,
                                  lambda: os.unlink(filler))
        self.event("disk_full", filler_bytes=written, free_bytes=free, queue_acked=acked)

    def sample(self, mark):
        s = {"mark": mark, "t": round(time.time() - self.started, 1), "acked": self.total_acked()}
        for queue, bridge in self.bridges.items():
            st = proc_status(bridge.proc.pid) if bridge.alive() else None
            s[bridge.name] = {
                "instance": bridge.instance,
                "age_s": round(time.time() - bridge.started_time, 1),
                "pid": bridge.proc.pid if bridge.proc else None,
                "acked_since_start": self.stats[queue]["acked"] - bridge.started_at_acked,
                "rss_kib": st and st.get("VmRSS"),
                "hwm_kib": st and st.get("VmHWM"),
            }
        for name, proc in (("emulator", self.procs["emulator"]), ("nats-server", self.nats_proc),
                           ("proxy", self.procs["proxy"])):
            st = proc_status(proc.pid)
            s[name + "_rss_kib"] = st and st.get("VmRSS")
        self.samples.append(s)
        log("RSS at {:,}: nats-bridge {} KiB (process {}, {:,} acked since its start), "
            "jsonl-bridge {} KiB (process {}, {:,}), emulator {} KiB, nats-server {} KiB".format(
                mark, s["nats-bridge"]["rss_kib"], s["nats-bridge"]["instance"],
                s["nats-bridge"]["acked_since_start"], s["jsonl-bridge"]["rss_kib"],
                s["jsonl-bridge"]["instance"], s["jsonl-bridge"]["acked_since_start"],
                s["emulator_rss_kib"], s["nats-server_rss_kib"]))

    def run(self):
        a = self.args
        self.started = time.time()
        for queue in self.target:
            self.stats[queue] = self.queue_stats(queue)
        self.seed_if_low()
        for queue, bridge in self.bridges.items():
            bridge.start(0)
        plan = self.plan()
        log("fault plan: " + ", ".join(f"{kind}{'(' + q + ')' if q else ''}@{share:.3f}"
                                        for share, kind, q in plan))
        mark_every = a.mark_every or max(1, a.messages // 10)
        next_mark = mark_every
        last_progress = 0
        last_scrape = 0
        last_rate = (time.time(), 0)
        deadline = self.started + a.max_minutes * 60
        while True:
            now = time.time()
            if now > deadline:
                raise TimeoutError(f"not finished after {a.max_minutes} minutes")
            for queue in self.target:
                self.stats[queue] = self.queue_stats(queue)
            acked = self.total_acked()
            # Due follow-ups (restarts, NATS back, disk freed).
            for item in sorted(self.pending, key=lambda p: p[0]):
                if item[0] <= now:
                    self.pending.remove(item)
                    item[2]()
            # Bridges that died on their own: log, keep the log, restart.
            for queue, bridge in self.bridges.items():
                if bridge.proc is not None and not bridge.alive() and not any(
                        p[1] == f"restart {bridge.name}" for p in self.pending):
                    code = bridge.proc.returncode
                    bridge.retire_counters()
                    bridge.crashes.append({"instance": bridge.instance, "exit": code,
                                           "log": bridge.log_path, "tail": tail(bridge.log_path, 15)})
                    self.event("bridge_exited_by_itself", bridge=bridge.name, exit=code,
                               log=bridge.log_path)
                    if len(bridge.crashes) > a.max_crashes:
                        raise RuntimeError(f"{bridge.name} keeps exiting; see {bridge.log_path}")
                    self.pending.append((now + 2.0, f"restart {bridge.name}",
                                         lambda q=queue: self.restart(q)))
            # Fault points.
            # Fault points beyond a cut-short run's end are dropped.
            plan = [p for p in plan if p[0] * a.messages < self.messages]
            while plan and acked >= plan[0][0] * a.messages:
                # An outage starts only after the one of its kind is over (in a short run
                # two can fall due within seconds): they share the NATS server or the
                # filler file, and each is judged on its own.
                due = plan[0][1]
                if due in OUTAGE_OF and any(p[1] == f"{OUTAGE_OF[due]} over"
                                            for p in self.pending):
                    break
                _, kind, queue = plan.pop(0)
                if kind == "kill":
                    self.do_kill(queue)
                elif kind == "nats_restart":
                    self.do_nats_restart()
                else:
                    self.do_disk_full()
            # RSS marks.
            while acked >= next_mark and next_mark <= self.messages:
                self.sample(next_mark)
                next_mark += mark_every
            self.seed_if_low()
            if now - last_scrape >= 2:
                for bridge in self.bridges.values():
                    bridge.scrape()
                last_scrape = now
            if now - last_progress >= a.progress_secs:
                t0, a0 = last_rate
                rate = (acked - a0) / max(0.001, now - t0)
                last_rate = (now, acked)
                last_progress = now
                log("acked {:,}/{:,} ({:.1f}%), {:.0f} msg/s; backlog nats {:,} jsonl {:,}; "
                    "seeded {:,}".format(
                        acked, self.messages, 100 * acked / self.messages, rate,
                        self.stats[QUEUE_NATS]["backlog"], self.stats[QUEUE_JSONL]["backlog"],
                        sum(self.seeded.values())))
            done = all(
                self.seeded[q] == self.target[q] and self.stats[q]["backlog"] == 0
                for q in self.target
            )
            if done and not self.pending and not plan:
                break
            time.sleep(a.tick_secs)
        self.duration = time.time() - self.started
        log(f"all {self.messages:,} messages acknowledged after {self.duration:.0f} s")
        if next_mark <= self.messages:
            self.sample(self.messages)

    # ---------- checks ----------

    def stop_bridges(self):
        self.exit_codes = {}
        for queue, bridge in self.bridges.items():
            code = bridge.stop()
            self.exit_codes[bridge.name] = code
            log(f"{bridge.name}: exit {code} after SIGTERM")

    def check_emulator(self):
        problems = []
        final = {}
        for queue, target in self.target.items():
            s = http_json(f"{self.emu}/_emulator/stats/{ACCOUNT}/{queue}")
            never = s.pop("never_acked_ids")
            s["never_acked_count"] = len(never)
            final[queue] = s
            for field, want in (("published", target), ("acked", target), ("backlog", 0),
                                ("in_flight", 0), ("dropped", 0), ("dead_lettered", 0),
                                ("never_acked_count", 0)):
                if s[field] != want:
                    problems.append(f"{queue}: {field} = {s[field]}, expected {want}")
            if never:
                problems.append(f"{queue}: never acked, first ones: {never[:5]}")
        return final, problems

    def check_jsonl(self):
        path = os.path.join(self.disk, "archive.jsonl")
        expected = self.expected[QUEUE_JSONL]
        lines = bad = unexpected = 0
        with open(path, "rb") as f:
            for raw in f:
                lines += 1
                try:
                    record = json.loads(raw)
                    key = bytes.fromhex(record["id"])
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                if key in expected:
                    expected[key] += 1
                else:
                    unexpected += 1
        return {"lines": lines, "unparseable_lines": bad, "unexpected_ids": unexpected,
                "bytes": os.path.getsize(path)}

    def check_nats(self):
        """Reads the whole stream back (headers only) and counts the ids."""
        expected = self.expected[QUEUE_NATS]
        reader = NatsStreamReader("127.0.0.1", self.nats_port)
        started = time.time()
        try:
            total, stream_bytes = reader.stream_state(STREAM)
            read = unexpected = no_header = 0
            for mid in reader.read_all(STREAM, total):
                read += 1
                if mid is None:
                    no_header += 1
                    continue
                key = bytes.fromhex(mid.decode())
                if key in expected:
                    expected[key] += 1
                else:
                    unexpected += 1
        finally:
            reader.close()
        log(f"read {read:,} NATS messages in {time.time() - started:.0f} s")
        return {"stream_messages": total, "read": read, "unexpected_ids": unexpected,
                "without_msg_id": no_header, "stream_bytes": stream_bytes}

    @staticmethod
    def copies(expected):
        missing = sum(1 for c in expected.values() if c == 0)
        dup_ids = sum(1 for c in expected.values() if c > 1)
        extra = sum(c - 1 for c in expected.values() if c > 1)
        most = max(expected.values(), default=0)
        return {"ids": len(expected), "missing": missing, "ids_with_duplicates": dup_ids,
                "duplicate_copies": extra, "most_copies": most}

    def cleanup(self):
        for bridge in self.bridges.values():
            if bridge.alive():
                bridge.proc.kill()
                bridge.proc.wait()
        for proc in list(self.procs.values()) + [self.nats_proc]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.mounted and not self.args.keep:
            subprocess.run(["umount", self.disk], check=False)
            self.mounted = False
        if not self.args.keep:
            shutil.rmtree(os.path.join(self.workdir, "nats-store"), ignore_errors=True)


def commit_of_repo():
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src", "sinks",
                                "Cargo.toml", "Cargo.lock"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes in src/ or sinks/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine():
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // (1024 * 1024)
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}"


def rss_summary(samples, name, warm):
    """First, last, range of a bridge's RSS over the marks where its process had acked at
    least `warm` messages (a process that has just started is not yet at its steady size)."""
    values = [(s["mark"], s[name]["rss_kib"], s[name]["instance"]) for s in samples
              if s[name]["rss_kib"] and s[name]["acked_since_start"] >= warm]
    if len(values) < 2:
        return None
    first, last = values[0][1], values[-1][1]
    lo = min(v for _, v, _ in values)
    hi = max(v for _, v, _ in values)
    return {"marks_used": [m for m, _, _ in values], "warm_after_acks": warm,
            "first_kib": first, "last_kib": last, "min_kib": lo, "max_kib": hi,
            "last_vs_first_pct": round(100 * (last - first) / first, 1),
            "max_vs_first_pct": round(100 * (hi - first) / first, 1),
            "flat_within_10pct": abs(last - first) <= 0.10 * first}


def write_report(soak, report):
    with open(os.path.join(soak.workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [
        f"# Soak run, {report['messages']:,} messages",
        "",
        f"- command: `{report['command']}`",
        f"- bridge commit: {report['commit']}",
        f"- machine: {report['machine']}",
        f"- duration: {report['duration_s']:.0f} s ({report['throughput']:.0f} msg/s acknowledged)",
        f"- result: **{report['verdict']}**",
        "",
        "## Destinations",
        "",
        "| queue | seeded | missing | duplicate copies (ids with duplicates, most copies) | notes |",
        "|---|---|---|---|---|",
    ]
    for queue, dest in report["destinations"].items():
        c = dest["copies"]
        lines.append(f"| {queue} | {c['ids']:,} | {c['missing']:,} | {c['duplicate_copies']:,} "
                     f"({c['ids_with_duplicates']:,}, {c['most_copies']}) | {dest['notes']} |")
    lines += ["", "## RSS after each mark (KiB; process number and acks since its start)", "",
              "| acked | nats-bridge | jsonl-bridge | emulator | nats-server |", "|---|---|---|---|---|"]
    for s in report["samples"]:
        lines.append("| {:,} | {} (#{}, {:,}) | {} (#{}, {:,}) | {} | {} |".format(
            s["mark"], s["nats-bridge"]["rss_kib"], s["nats-bridge"]["instance"],
            s["nats-bridge"]["acked_since_start"], s["jsonl-bridge"]["rss_kib"],
            s["jsonl-bridge"]["instance"], s["jsonl-bridge"]["acked_since_start"],
            s["emulator_rss_kib"], s["nats-server_rss_kib"]))
    lines += ["", "## Events", ""]
    for e in report["events"]:
        lines.append(f"- {json.dumps(e)}")
    lines += ["", "## Everything else", "", "```", json.dumps(
        {k: report[k] for k in ("rss", "outages", "emulator", "proxy", "bridge_counters", "crashes",
                                "exit_codes", "problems")}, indent=2), "```"]
    with open(os.path.join(soak.workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_args(argv):
    p = argparse.ArgumentParser(description="cfq-bridge soak run (see the module doc)")
    p.add_argument("--messages", type=int, default=10_000_000, help="total, split over 2 queues")
    p.add_argument("--binary", default=os.path.join(REPO, "target", "release", "cfq-bridge"))
    p.add_argument("--nats-server", default=shutil.which("nats-server") or "/usr/sbin/nats-server")
    p.add_argument("--workdir", default=None, help="default: /tmp/cfq-soak-TIMESTAMP")
    p.add_argument("--seed", type=int, default=None, help="random seed (printed)")
    p.add_argument("--chunk", type=int, default=50_000,
                   help="messages seeded at a time per queue, when its backlog is below this")
    p.add_argument("--body-size", type=int, default=128)
    p.add_argument("--rate-500", type=float, default=0.05)
    p.add_argument("--rate-429", type=float, default=0.02)
    p.add_argument("--rate-applied-500", type=float, default=0.01)
    p.add_argument("--latency-ms", type=float, default=2)
    p.add_argument("--jitter-ms", type=float, default=15)
    p.add_argument("--stall-rate", type=float, default=0.003)
    p.add_argument("--reset-rate", type=float, default=0.003)
    p.add_argument("--nats-down-secs", type=float, default=15)
    p.add_argument("--disk-full-secs", type=float, default=20)
    p.add_argument("--settle-secs", type=float, default=8,
                   help="acks in this first part of an outage are not counted against it")
    p.add_argument("--tmpfs-mb", type=int, default=0, help="default: sized from --messages")
    p.add_argument("--mark-every", type=int, default=0,
                   help="RSS sample every N acks (default: a tenth of --messages)")
    p.add_argument("--max-minutes", type=float, default=180,
                   help="abort (exit 2) when not drained after this long")
    p.add_argument("--seed-minutes", type=float, default=0,
                   help="stop seeding after this long and finish with what was seeded "
                        "(a deadline; reported as a run cut short); 0: never")
    p.add_argument("--max-crashes", type=int, default=40,
                   help="abort when a bridge exits by itself more often than this")
    p.add_argument("--progress-secs", type=float, default=30)
    p.add_argument("--tick-secs", type=float, default=1.0)
    p.add_argument("--workdir-tmpfs-mb", type=int, default=0,
                   help="mount a tmpfs of this size on the work directory first (logs, NATS "
                        "file store, journals), so that a full root filesystem cannot hit them")
    p.add_argument("--ack-concurrency", default="auto",
                   help='the bridges\' queue.ack_concurrency: "auto" (the default) or 1..64')
    p.add_argument("--keep", action="store_true", help="keep the tmpfs and the NATS store")
    args = p.parse_args(argv)
    # Checked (and turned into its TOML form) before anything starts.
    args.ack_concurrency_toml = ack_concurrency_toml(args.ack_concurrency)
    if args.seed is None:
        args.seed = random.randrange(2**63)
    if args.workdir is None:
        args.workdir = f"/tmp/cfq-soak-{time.strftime('%Y%m%d-%H%M%S')}"
    args.workdir = os.path.abspath(args.workdir)
    return args


def ack_concurrency_toml(value):
    """`--ack-concurrency` as a TOML value: the string "auto" or a number of calls."""
    if value == "auto":
        return '"auto"'
    if value.isdigit() and 1 <= int(value) <= 64:
        return value
    raise SystemExit(f'--ack-concurrency must be "auto" or 1..64, got {value!r}')


def main(argv):
    args = parse_args(argv)
    command = "scripts/soak.sh " + " ".join(argv)
    log(f"soak: {args.messages:,} messages, seed {args.seed}, work dir {args.workdir}")
    os.makedirs(args.workdir, exist_ok=True)
    soak = Soak(args)
    try:
        soak.setup()
        soak.run()
    except (RuntimeError, TimeoutError, OSError, subprocess.CalledProcessError) as e:
        log(f"SOAK ABORTED: {e}")
        try:
            for queue in soak.target:
                log(f"{queue}: {soak.queue_stats(queue)}")
        except Exception:
            pass
        soak.cleanup()
        return 2
    try:
        soak.stop_bridges()
        for bridge in soak.bridges.values():
            bridge.scrape()
        emulator_final, problems = soak.check_emulator()
        log("checking NATS")
        nats_result = soak.check_nats()
        log("checking the JSONL archive")
        jsonl_result = soak.check_jsonl()
    except Exception as e:  # the checks could not run: no verdict
        log(f"SOAK CHECK FAILED TO RUN: {e!r}")
        soak.cleanup()
        return 2
    nats_copies = Soak.copies(soak.expected[QUEUE_NATS])
    jsonl_copies = Soak.copies(soak.expected[QUEUE_JSONL])
    for name, copies, res in (("NATS", nats_copies, nats_result),
                              ("JSONL", jsonl_copies, jsonl_result)):
        if copies["missing"]:
            problems.append(f"{name}: {copies['missing']:,} seeded ids missing")
        if res["unexpected_ids"]:
            problems.append(f"{name}: {res['unexpected_ids']:,} records with ids never seeded")
    if jsonl_result["unparseable_lines"]:
        problems.append(f"JSONL: {jsonl_result['unparseable_lines']} lines do not parse")
    if nats_result["without_msg_id"]:
        problems.append(f"NATS: {nats_result['without_msg_id']} messages without Nats-Msg-Id")
    for name, code in soak.exit_codes.items():
        if code != 0:
            problems.append(f"{name}: exit {code} after SIGTERM")
    for bridge in soak.bridges.values():
        for line in open(bridge.log_path, errors="replace"):
            if "panicked" in line:
                problems.append(f"{bridge.name}: panic in {bridge.log_path}")
                break
    try:
        with open(soak.proxy_stats) as f:
            proxy = json.load(f)
    except OSError:
        proxy = {}
    lost = nats_copies["missing"] + jsonl_copies["missing"]
    counters = {b.name: {k: int(v) for k, v in sorted(b.counters().items())}
                for b in soak.bridges.values()}
    report = {
        "messages": soak.messages,
        "messages_planned": args.messages,
        "cut_short": soak.cut_short,
        "command": command,
        "seed": args.seed,
        "commit": commit_of_repo(),
        "machine": machine(),
        "duration_s": soak.duration,
        "throughput": soak.messages / soak.duration,
        "verdict": f"{lost} lost out of {soak.messages:,}" + ("" if not problems else
                                                                f"; {len(problems)} problems"),
        "destinations": {
            QUEUE_NATS: {"copies": nats_copies, "check": nats_result,
                         "notes": "stream copies beyond one per id (the server's 600 s "
                                  "duplicate window drops most redeliveries; the bridge "
                                  "counted {:,} PubAcks flagged duplicate)".format(
                                      counters["nats-bridge"].get("duplicates", 0))},
            QUEUE_JSONL: {"copies": jsonl_copies, "check": jsonl_result,
                          "notes": f"{jsonl_result['lines']:,} archive lines"},
        },
        "samples": soak.samples,
        "rss": {b.name: rss_summary(soak.samples, b.name,
                                    min(50_000, max(1, soak.messages // 40)))
                for b in soak.bridges.values()},
        "events": soak.events,
        "outages": soak.outages,
        "emulator": emulator_final,
        "proxy": proxy,
        "bridge_counters": counters,
        "crashes": {b.name: b.crashes for b in soak.bridges.values()},
        "exit_codes": soak.exit_codes,
        "tmpfs_mb": soak.tmpfs_mb,
        "problems": problems,
    }
    write_report(soak, report)
    soak.cleanup()
    log(f"NATS: {nats_copies}; {nats_result}")
    log(f"JSONL: {jsonl_copies}; {jsonl_result}")
    log(f"RSS: {report['rss']}")
    log(f"proxy: {proxy}")
    for p in problems:
        log(f"PROBLEM: {p}")
    log(f"VERDICT: {report['verdict']}; report in {args.workdir}/report.md")
    return 1 if (lost or problems) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
