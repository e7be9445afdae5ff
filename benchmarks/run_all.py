"""Run every benchmark one after another, each in its own process, and collect their JSON result lines.

    python -m benchmarks.run_all                         # full scale; an estimate: 20 to 30 minutes on 2 cores
    python -m benchmarks.run_all --smoke                 # small scale, to check that everything runs
    python -m benchmarks.run_all --output results.jsonl  # also write the BENCHMARK-JSON lines to a file

Each benchmark starts and stops its own server, fake provider and databases. A failed benchmark is
reported and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path

from benchmarks.common import REPOSITORY_ROOT

# Module name, then the arguments of the small-scale (--smoke) run. Full runs use each script's defaults.
BENCHMARKS: list[tuple[str, list[str]]] = [
    (
        "benchmarks.gateway_overhead",
        ["--requests", "300", "--stream-requests", "100", "--relay-replies", "40", "--relay-rounds", "2"],
    ),
    ("benchmarks.read_throughput", ["--seconds", "2", "--rounds", "1"]),
    ("benchmarks.open_streams", ["--streams", "100", "--step", "25", "--hold-seconds", "120"]),
    ("benchmarks.history_length", ["--requests", "20", "--rounds", "2"]),
    ("benchmarks.jobs_throughput", ["--jobs", "200", "--latency-jobs", "40"]),
    ("benchmarks.provider_tls", ["--requests", "200"]),
    ("benchmarks.provider_client", ["--requests", "300", "--stream-requests", "100"]),
    ("benchmarks.chat_reads", ["--requests", "200"]),
    ("benchmarks.commit_flush", ["--statements", "400"]),
    ("benchmarks.sqlite_commit_trip", ["--blocks", "400"]),
]
JSON_PREFIX = "BENCHMARK-JSON "
# Far above the longest full run of one benchmark; a benchmark that passes it is stopped and counted failed.
BENCHMARK_TIMEOUT_SECONDS = 3 * 3600


def run_one(module: str, extra: list[str]) -> tuple[int, list[str]]:
    """Run one benchmark, echoing its output, and return its exit status and JSON lines."""
    command = [sys.executable, "-m", module, *extra]
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    json_lines: list[str] = []
    process = subprocess.Popen(  # noqa: S603  (fixed module names from BENCHMARKS)
        command, cwd=REPOSITORY_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    # SIGTERM lets the benchmark's finally blocks stop its servers and drop its database.
    watchdog = threading.Timer(BENCHMARK_TIMEOUT_SECONDS, process.terminate)
    watchdog.start()
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            if line.startswith(JSON_PREFIX):
                json_lines.append(line.removeprefix(JSON_PREFIX).strip())
        status = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        status = process.wait()
    finally:
        watchdog.cancel()
    return status, json_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="run each benchmark at small scale")
    parser.add_argument("--only", default=None, help="comma-separated module names without 'benchmarks.' to run")
    parser.add_argument("--output", type=Path, default=None, help="file to write the BENCHMARK-JSON lines to")

    arguments = parser.parse_args()

    selected = BENCHMARKS
    if arguments.only:
        requested = {f"benchmarks.{name.strip()}" for name in arguments.only.split(",")}
        unknown = requested - {module for module, _ in BENCHMARKS}
        if unknown:
            parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
        selected = [(module, extra) for module, extra in BENCHMARKS if module in requested]

    failures: list[str] = []
    all_json: list[str] = []
    for module, smoke_arguments in selected:
        status, json_lines = run_one(module, smoke_arguments if arguments.smoke else [])
        if status != 0:
            failures.append(f"{module} (exit status {status})")
        all_json.extend(json_lines)

    if arguments.output is not None:
        arguments.output.write_text("".join(line + "\n" for line in all_json))
        print(f"\nwrote {len(all_json)} result lines to {arguments.output}")
    if failures:
        print("\nfailed: " + ", ".join(failures), file=sys.stderr)
        sys.exit(1)
    print(f"\nall {len(selected)} benchmarks finished")


if __name__ == "__main__":
    main()
