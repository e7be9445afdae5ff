"""The garbage collector settings of server processes, checked in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pocketllm.kit.collector import YOUNG_GENERATION_THRESHOLD

# Builds the app as `pocketllm serve` does in each server process, then prints the collector's state.
_SERVER_PROCESS = """
import gc
from pocketllm.app import create_app_from_environment
print(gc.get_threshold()[0], gc.get_freeze_count())
create_app_from_environment()
print(gc.get_threshold()[0], gc.get_freeze_count())
"""


def test_server_factory_tunes_collector(tmp_path: Path) -> None:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "JWT_", "INVITE_", "ENCRYPTION_", "REDIS_"))
    }
    environment.update(
        {
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'pocketllm.db'}",
            "DATA_DIR": str(tmp_path / "data"),
            "LOG_LEVEL": "WARNING",
        }
    )

    result = subprocess.run(  # noqa: S603  (fixed interpreter and script)
        [sys.executable, "-c", _SERVER_PROCESS],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    before, after = (line.split() for line in result.stdout.splitlines())
    assert before == ["700", "0"]
    assert int(after[0]) == YOUNG_GENERATION_THRESHOLD
    assert int(after[1]) > 0
