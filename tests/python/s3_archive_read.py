"""An independent reader of the s3 sink's archive, for tests/s3_sink.rs.

Lists every object under s3://BUCKET/PREFIX with pyarrow's S3 client, reads each one
(Parquet with pyarrow; JSONL, gzip or zstd with the standard library and `zstandard`), and
prints one JSON line per record: {"key", "id", "queue_id", "timestamp_ms", "content_type",
"body"}, where "body" is the decoded body in a comparable form: the text for `text`, the
parsed JSON value for `json`, standard base64 for `bytes` and `v8`. A last line
{"objects": N, "records": M} closes the output.

Usage: python3 s3_archive_read.py ENDPOINT BUCKET PREFIX
Credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment.
"""

import base64
import datetime
import gzip
import io
import json
import os
import sys
from urllib.parse import urlparse

import pyarrow.fs
import pyarrow.parquet
import zstandard


def comparable(content_type, body):
    """The body (bytes) in the form the test compares."""
    if content_type == "text":
        return body.decode("utf-8")
    if content_type == "json":
        return json.loads(body)
    return base64.b64encode(body).decode("ascii")


def parquet_records(data):
    table = pyarrow.parquet.read_table(io.BytesIO(data))
    expected = ["id", "queue_id", "timestamp", "attempts", "content_type", "metadata", "body"]
    if table.column_names != expected:
        raise SystemExit(f"unexpected columns {table.column_names}")
    for row in table.to_pylist():
        stamp = row["timestamp"]
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=datetime.timezone.utc)
        millis = int(stamp.timestamp() * 1000 + 0.5)
        json.loads(row["metadata"])
        yield {
            "id": row["id"],
            "queue_id": row["queue_id"],
            "timestamp_ms": millis,
            "content_type": row["content_type"],
            "body": comparable(row["content_type"], row["body"]),
        }


def jsonl_records(key, data):
    if key.endswith(".zst"):
        # Every frame of the object, in order.
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        chunks = []
        while chunk := reader.read(1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
    elif key.endswith(".gz"):
        data = gzip.decompress(data)
    for line in data.splitlines():
        record = json.loads(line)
        body = record["body"]
        if record["content_type"] == "json":
            value = body
        elif record["content_type"] == "text":
            value = body
        else:
            value = base64.b64encode(base64.b64decode(body, validate=True)).decode("ascii")
        yield {
            "id": record["id"],
            "queue_id": record["queue_id"],
            "timestamp_ms": record["timestamp_ms"],
            "content_type": record["content_type"],
            "body": value,
        }


def main():
    endpoint, bucket, prefix = sys.argv[1:4]
    url = urlparse(endpoint)
    fs = pyarrow.fs.S3FileSystem(
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=url.netloc,
        scheme=url.scheme,
        region="us-east-1",
    )
    base = f"{bucket}/{prefix}".rstrip("/")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
    objects = 0
    records = 0
    out = sys.stdout
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pyarrow.fs.FileType.File:
            continue
        key = info.path[len(bucket) + 1 :]
        # compression=None: the raw object (pyarrow would otherwise undo .zst and .gz).
        with fs.open_input_stream(info.path, compression=None) as stream:
            data = stream.read()
        objects += 1
        rows = parquet_records(data) if key.endswith(".parquet") else jsonl_records(key, data)
        for row in rows:
            row["key"] = key
            out.write(json.dumps(row) + "\n")
            records += 1
    out.write(json.dumps({"objects": objects, "records": records}) + "\n")
    out.flush()
    # The AWS SDK inside pyarrow must be shut down before the interpreter tears down its
    # threads, or the process can abort at exit ("terminate called without an active
    # exception", apache/arrow#34314 and #41087) after printing everything: drop the last
    # filesystem reference and finalize S3 here, while the interpreter is whole.
    del fs
    pyarrow.fs.finalize_s3()


if __name__ == "__main__":
    main()
    # Skip the interpreter's own teardown as well: main() flushed the output, and nothing
    # else is left to run at exit, so a crash in a library's destructor cannot turn a
    # complete read into a failed one.
    os._exit(0)
