"""Compare sign-in latency for a wrong password and for an unknown e-mail address.

Both must answer 401 `invalid_credentials` in about the same time, so that response times do not tell
which addresses have accounts. Runs the app in-process on a temporary SQLite database with the default
Argon2id costs, interleaving the two cases so that machine noise hits both alike.

    .venv/bin/python benchmarks/signin_timing.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from pocketllm.app import create_app
from pocketllm.config import Settings


async def measure(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        settings = Settings(_env_file=None, data_dir=Path(directory), invite_code=False, log_level="WARNING")  # type: ignore[call-arg]
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                signup = await client.post(
                    "/v1/auth/signup", json={"email": "known@example.com", "password": "Correct-Horse-1"}
                )
                signup.raise_for_status()

                cases = {
                    "wrong password": {"email": "known@example.com", "password": "Wrong-Horse-1"},
                    "unknown e-mail": {"email": "nobody@example.com", "password": "Wrong-Horse-1"},
                }
                timings: dict[str, list[float]] = {name: [] for name in cases}
                for _ in range(rounds):
                    for name, payload in cases.items():
                        started = time.perf_counter()
                        response = await client.post("/v1/auth/signin", json=payload)
                        timings[name].append((time.perf_counter() - started) * 1000)
                        assert response.status_code == 401, response.text

    baseline = statistics.median(timings["wrong password"])
    print(f"rounds per case: {rounds}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:<15} median {median:7.1f} ms   ratio to wrong password {median / baseline:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="sign-ins per case (default: %(default)s)")
    arguments = parser.parse_args()
    asyncio.run(measure(arguments.rounds))


if __name__ == "__main__":
    main()
