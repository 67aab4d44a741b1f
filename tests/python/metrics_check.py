"""Parses a Prometheus text exposition from stdin with the Prometheus project's own
parser (PyPI `prometheus-client`) and prints one JSON object per metric family:
name, type, help text and samples. A line the parser refuses ends the script with an
error, so the caller's test fails.

Used by tests/metrics_endpoint.rs."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> None:
    text = sys.stdin.read()
    for family in text_string_to_metric_families(text):
        print(
            json.dumps(
                {
                    "name": family.name,
                    "type": family.type,
                    "help": family.documentation,
                    "samples": [
                        {"name": s.name, "labels": s.labels, "value": s.value}
                        for s in family.samples
                    ],
                }
            )
        )


if __name__ == "__main__":
    main()
