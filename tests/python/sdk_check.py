"""Checks that Cloudflare's official Python SDK (PyPI `cloudflare`) works unchanged
against `cfq-bridge emulator`: push, bulk push, pull, ack, retry (with and without a
delay), queue details, and the documented errors.

Usage: python3 tests/python/sdk_check.py BASE_URL TOKEN
(BASE_URL as printed by the emulator, e.g. http://127.0.0.1:8787/client/v4).
Exits 0 when every check passed, 1 when one failed, 2 when the SDK is missing.
"""

import base64
import json
import sys
import time

try:
    import cloudflare
    from cloudflare import Cloudflare
except ImportError:
    print(
        "sdk_check: the `cloudflare` module is missing; run "
        "`pip install -r tests/python/requirements.txt`",
        file=sys.stderr,
    )
    sys.exit(2)

ACCOUNT = "023e105f4ecef8ad9ca31a8372d0c353"
QUEUE = "sdkcheck"

checks = 0


def check(condition, what):
    global checks
    if not condition:
        print(f"sdk_check: FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1
    print(f"ok - {what}")


def decode(message):
    kind = message.metadata["CF-Content-Type"]
    if kind == "text":
        return message.body
    return json.loads(base64.b64decode(message.body))


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(1)
    base_url, token = sys.argv[1], sys.argv[2]
    print(f"sdk_check: cloudflare {cloudflare.__version__} against {base_url}")
    client = Cloudflare(api_token=token, base_url=base_url, max_retries=0)
    messages = client.queues.messages

    pushed = messages.push(QUEUE, account_id=ACCOUNT, body="hello", content_type="text")
    check(pushed.metadata.metrics.backlog_count == 1, "push text; metrics.backlog_count is 1")
    messages.push(QUEUE, account_id=ACCOUNT, body={"a": 1}, content_type="json")
    bulk = messages.bulk_push(
        QUEUE,
        account_id=ACCOUNT,
        messages=[
            {"body": "t1", "content_type": "text"},
            {"body": {"n": 2}, "content_type": "json"},
            {"body": {"list": [1, 2]}},
        ],
    )
    check(bulk.metadata.metrics.backlog_count == 5, "bulk push; metrics.backlog_count is 5")
    check(bulk.metadata.metrics.backlog_bytes > 0, "bulk push; metrics.backlog_bytes > 0")

    pulled = messages.pull(QUEUE, account_id=ACCOUNT, batch_size=10, visibility_timeout_ms=5000)
    check(pulled.message_backlog_count == 5, "pull; message_backlog_count is 5")
    check(len(pulled.messages) == 5, "pull returns the five messages")
    bodies = [decode(m) for m in pulled.messages]
    check(
        bodies == ["hello", {"a": 1}, "t1", {"n": 2}, {"list": [1, 2]}],
        f"bodies decode by CF-Content-Type (text plain, json base64): {bodies}",
    )
    check(all(m.attempts == 1 for m in pulled.messages), "first delivery has attempts 1")
    check(all(len(m.id) == 32 for m in pulled.messages), "ids are 32 characters")
    check(pulled.metadata.metrics.backlog_count == 5, "pull carries metadata.metrics")

    leases = [m.lease_id for m in pulled.messages]
    acked = messages.ack(
        QUEUE,
        account_id=ACCOUNT,
        acks=[{"lease_id": lease} for lease in leases[:2]],
        retries=[{"lease_id": lease, "delay_seconds": 0} for lease in leases[2:]],
    )
    check(acked.ack_count == 2 and acked.retry_count == 3, "ack 2 and retry 3 are counted")
    check(not acked.warnings, "no warnings for current leases")

    again = messages.pull(QUEUE, account_id=ACCOUNT, batch_size=10)
    check(again.message_backlog_count == 3, "backlog is 3 after acking 2")
    check(
        [m.id for m in again.messages] == [m.id for m in pulled.messages[2:]],
        "retried messages come back with the same ids",
    )
    check(all(m.attempts == 2 for m in again.messages), "retried messages have attempts 2")

    leases = [m.lease_id for m in again.messages]
    messages.ack(
        QUEUE,
        account_id=ACCOUNT,
        acks=[{"lease_id": lease} for lease in leases[1:]],
        retries=[{"lease_id": leases[0], "delay_seconds": 1}],
    )
    empty = messages.pull(QUEUE, account_id=ACCOUNT)
    check(len(empty.messages) == 0, "a message retried with a delay is held back")
    check(empty.message_backlog_count == 1, "the delayed message is still in the backlog")
    time.sleep(1.5)
    late = messages.pull(QUEUE, account_id=ACCOUNT)
    check(len(late.messages) == 1 and late.messages[0].attempts == 3, "after the delay it returns with attempts 3")
    done = messages.ack(QUEUE, account_id=ACCOUNT, acks=[{"lease_id": late.messages[0].lease_id}])
    check(done.ack_count == 1, "final ack")
    final = messages.pull(QUEUE, account_id=ACCOUNT)
    check(final.message_backlog_count == 0 and len(final.messages) == 0, "the queue is empty")

    warned = messages.ack(QUEUE, account_id=ACCOUNT, acks=[{"lease_id": "unknown-lease"}])
    check(warned.ack_count == 0 and "unknown-lease" in (warned.warnings or {}), "unknown lease ids give a warning")

    queue = client.queues.get(QUEUE, account_id=ACCOUNT)
    check(queue.queue_id == QUEUE, "queue details: queue_id")
    check(queue.consumers[0].type == "http_pull", "queue details: an http_pull consumer")
    check(queue.consumers[0].settings.max_retries == 3, "queue details: max_retries 3")

    try:
        messages.pull(QUEUE, account_id=ACCOUNT, batch_size=101)
        check(False, "batch_size 101 is rejected")
    except cloudflare.BadRequestError as error:
        check(error.status_code == 400, "batch_size 101 gives BadRequestError (400)")

    bad = Cloudflare(api_token="wrong-token", base_url=base_url, max_retries=0)
    try:
        bad.queues.messages.pull(QUEUE, account_id=ACCOUNT)
        check(False, "a wrong token is rejected")
    except cloudflare.AuthenticationError as error:
        check(error.status_code == 401, "a wrong token gives AuthenticationError (401)")

    print(f"sdk_check: {checks} passed, 0 failed")


if __name__ == "__main__":
    main()
