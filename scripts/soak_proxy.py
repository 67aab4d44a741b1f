#!/usr/bin/env python3
"""A TCP proxy that makes the network between the bridge and the API misbehave.

It sits between `cfq-bridge run` and the emulator (used by scripts/soak.py; netem is not
available on the project's machines). Every connection is forwarded byte for byte, but each
answer coming back from the server (the first bytes the server sends after the client wrote
something) meets three faults, rolled once per answer:

- latency: a delay of `--latency-ms` plus a uniform 0..`--jitter-ms`;
- a stall: with probability `--stall-rate`, the answer is held for a uniform
  `--stall-min-ms`..`--stall-max-ms` (longer than the bridge's request timeout, some of
  them make the request time out after the server applied it);
- a reset: with probability `--reset-rate`, a random prefix of the answer is forwarded,
  then both sides are closed with a TCP RST (SO_LINGER 0): the client sees a connection
  reset in the middle of an answer whose request the server already applied.

Counters (connections, answers, stalls, resets, bytes) go to `--stats-file` as JSON every
few seconds and at exit (SIGTERM or SIGINT).

    python3 scripts/soak_proxy.py --listen 127.0.0.1:9001 --target 127.0.0.1:8787
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import struct
import sys
import time


class Counters:
    """What the proxy did so far."""

    def __init__(self):
        self.connections = 0
        self.live = 0
        self.answers = 0
        self.stalls = 0
        self.resets = 0
        self.connect_failures = 0
        self.bytes_to_server = 0
        self.bytes_to_client = 0

    def as_dict(self):
        return dict(vars(self))


def reset_socket(writer):
    """Closes a stream with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Proxy:
    def __init__(self, args):
        self.args = args
        self.counters = Counters()
        self.rng = random.Random(args.seed)

    async def handle(self, client_reader, client_writer):
        counters = self.counters
        try:
            server_reader, server_writer = await asyncio.open_connection(
                self.args.target_host, self.args.target_port
            )
        except OSError:
            counters.connect_failures += 1
            reset_socket(client_writer)
            return
        counters.connections += 1
        counters.live += 1
        for w in (client_writer, server_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Set when the client wrote since the last answer began: the next bytes from the
        # server start a new answer.
        state = {"request_pending": False, "closed": False}

        async def client_to_server():
            while True:
                data = await client_reader.read(65536)
                if not data:
                    break
                state["request_pending"] = True
                counters.bytes_to_server += len(data)
                server_writer.write(data)
                await server_writer.drain()

        async def server_to_client():
            args = self.args
            while True:
                data = await server_reader.read(65536)
                if not data:
                    break
                if state["request_pending"]:
                    state["request_pending"] = False
                    counters.answers += 1
                    delay = (args.latency_ms + self.rng.uniform(0, args.jitter_ms)) / 1000
                    roll = self.rng.random()
                    if roll < args.reset_rate and len(data) > 1:
                        counters.resets += 1
                        cut = self.rng.randrange(1, len(data))
                        await asyncio.sleep(delay)
                        client_writer.write(data[:cut])
                        await client_writer.drain()
                        # Let the client read the prefix before the RST arrives.
                        await asyncio.sleep(self.rng.uniform(0.002, 0.03))
                        state["closed"] = True
                        reset_socket(client_writer)
                        reset_socket(server_writer)
                        return
                    if roll < args.reset_rate + args.stall_rate:
                        counters.stalls += 1
                        delay += self.rng.uniform(args.stall_min_ms, args.stall_max_ms) / 1000
                    await asyncio.sleep(delay)
                counters.bytes_to_client += len(data)
                client_writer.write(data)
                await client_writer.drain()

        tasks = [
            asyncio.ensure_future(client_to_server()),
            asyncio.ensure_future(server_to_client()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not state["closed"]:
                for w in (client_writer, server_writer):
                    try:
                        w.close()
                    except Exception:
                        pass
            counters.live -= 1

    def write_stats(self):
        path = self.args.stats_file
        if not path:
            return
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.counters.as_dict(), f)
            os.replace(tmp, path)
        except OSError as e:
            # A full disk must not stop the proxy (it did once, mid-soak).
            print(f"soak proxy: cannot write {path}: {e}", file=sys.stderr, flush=True)


async def main_async(args):
    proxy = Proxy(args)
    server = await asyncio.start_server(
        proxy.handle, args.listen_host, args.listen_port, backlog=512
    )
    port = server.sockets[0].getsockname()[1]
    print(f"soak proxy listening on {args.listen_host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=2.0)
        except asyncio.TimeoutError:
            pass
        proxy.write_stats()
    server.close()
    proxy.write_stats()


def host_port(text):
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on")
    p.add_argument("--target", required=True, help="HOST:PORT of the server")
    p.add_argument("--latency-ms", type=float, default=2.0, help="added to every answer (ms)")
    p.add_argument("--jitter-ms", type=float, default=15.0, help="plus uniform 0..this (ms)")
    p.add_argument("--stall-rate", type=float, default=0.003, help="share of answers stalled")
    p.add_argument("--stall-min-ms", type=float, default=2000.0)
    p.add_argument("--stall-max-ms", type=float, default=8000.0)
    p.add_argument("--reset-rate", type=float, default=0.003,
                   help="share of answers cut by an RST after a random prefix")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--stats-file", default=None, help="JSON counters, rewritten every 2 s")
    args = p.parse_args(argv)
    args.listen_host, args.listen_port = host_port(args.listen)
    args.target_host, args.target_port = host_port(args.target)
    return args


if __name__ == "__main__":
    try:
        asyncio.run(main_async(parse_args(sys.argv[1:])))
    except KeyboardInterrupt:
        pass
