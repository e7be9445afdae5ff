"""Scale-out proof: two API processes and two job workers share one PostgreSQL database and one Redis.

Run it from the repository root with the project installed (`scripts/test` installs it into .venv):

    .venv/bin/python scripts/scale_out.py

The script creates its own PostgreSQL database and temporary data directory, starts a fake
OpenAI-compatible provider on 127.0.0.1, applies the migrations once, and starts API processes A and B
(`pocketllm serve --no-worker`) and workers W1 and W2 (`pocketllm worker`). It then drives sign-ups, chats,
image jobs and rate-limited requests through both API ports at once, and kills with SIGKILL the worker
that runs a deliberately slow image job. It checks that

* every chat contains exactly the messages sent and their replies, in order, with sequence numbers 1..N;
* every image job, each posted to both ports at once with one Idempotency-Key, exists once and completed,
  and the provider was asked once per attempt; its image loads through either API port;
* rate limits count across both API processes (per e-mail address on sign-in, per user on image jobs);
* the killed worker's job is claimed again after its lease ends and completes on the other worker;
* a session signed out through port A is rejected by port B, which had just checked it and keeps live
  sessions in memory, within SIGN_OUT_REACH_SECONDS.

It exits with 0 when every check passes, and with 1 after printing the failed checks and the end of each
process log. Everything runs on 127.0.0.1 and is bounded by OVERALL_TIMEOUT_SECONDS; the database, the
Redis keys and the temporary directory are removed at the end (`--keep-data` keeps the directory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from cryptography.fernet import Fernet
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.engine import make_url

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
# The fake provider lives in the test tree, which is not an installed package.
sys.path.insert(0, str(REPOSITORY_ROOT))

from tests.fakes.provider import DEFAULT_REPLY_TEXT, VALID_API_KEY, FakeProvider  # noqa: E402

# The PostgreSQL server on which the proof creates and drops its own database, as in the test suite.
ADMIN_DATABASE_URL = os.environ.get(
    "POCKETLLM_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
# A Redis database for the processes' rate-limit counts and catalogue cache. The test suite uses 15.
REDIS_URL = os.environ.get("POCKETLLM_SCALE_OUT_REDIS_URL", "redis://127.0.0.1:6379/14")
# Key prefixes that the server writes to Redis (kit/ratelimit.py and kit/cache.py). Their keys are deleted at the end.
REDIS_KEY_PATTERNS = ("pocketllm-ratelimit*", "pocketllm:*")

OVERALL_TIMEOUT_SECONDS = 180.0
STARTUP_TIMEOUT_SECONDS = 60.0
REQUEST_TIMEOUT_SECONDS = 30.0
JOBS_FINISH_TIMEOUT_SECONDS = 60.0
# Requests in flight at once, over both API ports together.
MAX_CONCURRENT_REQUESTS = 16

USERS = 20
CHATS_PER_USER = 5
MESSAGES_PER_CHAT = 3
IMAGE_JOBS = 30
IMAGE_MODEL = {"model": "dall-e-2", "size": "256x256"}

JOB_LEASE_SECONDS = 3.0
JOB_HEARTBEAT_SECONDS = 0.5
JOB_POLL_SECONDS = 0.2
WORKER_CONCURRENCY = 4
# The slow job's first provider call waits this long, far beyond the lease, so its worker is busy with it
# when it is killed. Stopping the fake provider at the end releases the wait.
SLOW_IMAGE_SECONDS = 60.0
# The holder of the slow job is killed once each worker has completed this many other image jobs.
JOBS_PER_WORKER_BEFORE_KILL = 2

SIGNIN_PER_EMAIL_LIMIT = 5
SIGNIN_ATTEMPTS = 12
JOBS_PER_USER_LIMIT = 5
LIMITED_JOB_ATTEMPTS = 12
# Far below SESSION_CACHE_SECONDS (30 by default), so only the trigger's notice can explain a pass.
SIGN_OUT_REACH_SECONDS = 5.0
PASSWORD = "scale-out password 1"  # noqa: S105  (the password of throwaway accounts)

T = TypeVar("T")


class ProofFailed(Exception):
    """A step of the proof could not be carried out. The message names the step and the reason."""


# -- processes -----------------------------------------------------------------------------------------------


@dataclass
class Child:
    """A `pocketllm` subprocess with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def child_environment(database_url: str, data_dir: Path, jwt_secret: str, encryption_key: str) -> dict[str, str]:
    """Build the settings shared by every process. Of this process's environment only PATH, HOME and the locale
    are passed on."""
    inherited = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "LC_ALL") if name in os.environ}
    return {
        **inherited,
        "ENVIRONMENT": "development",
        "DATABASE_URL": database_url,
        "DATABASE_POOL_SIZE": "5",
        "DATABASE_MAX_OVERFLOW": "5",
        "MIGRATE_ON_START": "false",
        "DATA_DIR": str(data_dir),
        "JWT_SECRET": jwt_secret,
        "ENCRYPTION_KEY": encryption_key,
        "REDIS_URL": REDIS_URL,
        "INVITE_CODE": "false",
        "ALLOW_PRIVATE_PROVIDER_URLS": "true",
        "JOB_LEASE_SECONDS": str(JOB_LEASE_SECONDS),
        "JOB_HEARTBEAT_SECONDS": str(JOB_HEARTBEAT_SECONDS),
        "JOB_POLL_SECONDS": str(JOB_POLL_SECONDS),
        "JOB_SHUTDOWN_GRACE_SECONDS": "2",
        "SHUTDOWN_GRACE_SECONDS": "2",
        "RATE_LIMIT_SIGNIN": "1000/minute",
        "RATE_LIMIT_SIGNIN_PER_EMAIL": f"{SIGNIN_PER_EMAIL_LIMIT}/minute",
        "RATE_LIMIT_SIGNUP": "1000/minute",
        "RATE_LIMIT_JOBS": f"{JOBS_PER_USER_LIMIT}/minute",
        # Cheaper password hashing than the defaults keeps the sign-ups of the workload fast.
        "PASSWORD_HASH_TIME_COST": "1",
        "PASSWORD_HASH_MEMORY_KIB": "8192",
        "LOG_LEVEL": "INFO",
    }


def start_child(name: str, arguments: list[str], environment: dict[str, str], directory: Path) -> Child:
    log_path = directory / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(  # noqa: S603  (this interpreter with fixed arguments)
            [sys.executable, "-m", "pocketllm", *arguments],
            env=environment,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Child(name, process, log_path)


def stop_children(children: Iterable[Child]) -> None:
    """Send SIGTERM to every child that still runs, then SIGKILL to any that has not exited after 10 s."""
    running = [child for child in children if child.process.poll() is None]
    for child in running:
        child.process.terminate()
    deadline = time.monotonic() + 10
    for child in running:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait(timeout=10)


async def run_migrations(environment: dict[str, str], directory: Path) -> Child:
    child = start_child("migrate", ["migrate"], environment, directory)
    try:
        returncode = await asyncio.wait_for(asyncio.to_thread(child.process.wait), STARTUP_TIMEOUT_SECONDS)
    except TimeoutError:
        raise ProofFailed(f"`pocketllm migrate` did not finish within {STARTUP_TIMEOUT_SECONDS:g} s") from None
    if returncode != 0:
        raise ProofFailed(f"`pocketllm migrate` exited with {returncode}:\n{child.log_tail()}")
    return child


async def wait_until_ready(children: list[Child], api_urls: dict[str, str]) -> None:
    """Wait until each API responds to GET /health/ready with 200 and each worker has logged `worker.started`."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    pending = {child.name for child in children}
    async with httpx.AsyncClient(timeout=2) as client:
        while pending:
            for child in children:
                if child.name not in pending:
                    continue
                if child.process.poll() is not None:
                    raise ProofFailed(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
                if child.name in api_urls:
                    try:
                        response = await client.get(f"{api_urls[child.name]}/health/ready")
                    except httpx.TransportError:
                        continue
                    if response.status_code == 200:
                        pending.discard(child.name)
                elif "worker.started" in child.log_text():
                    pending.discard(child.name)
            if pending and time.monotonic() > deadline:
                raise ProofFailed(f"not ready within {STARTUP_TIMEOUT_SECONDS:g} s: {', '.join(sorted(pending))}")
            await asyncio.sleep(0.2)


def pid_of_worker_id(worker_id: str) -> int:
    """Return the process id in a worker id, which `new_worker_id` builds as `<host>:<pid>:<random>`."""
    return int(worker_id.rsplit(":", 2)[-2])


# -- resources: database and Redis ---------------------------------------------------------------------------


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_database(name: str) -> str:
    """Create database `name` on the admin server and return its SQLAlchemy URL."""
    try:
        admin = await asyncpg.connect(asyncpg_dsn(ADMIN_DATABASE_URL), timeout=10)
    except (OSError, asyncpg.PostgresError) as error:
        raise ProofFailed(
            f"cannot connect to PostgreSQL at {make_url(ADMIN_DATABASE_URL).render_as_string()}: {error}. "
            "Start it or set POCKETLLM_TEST_POSTGRES_URL."
        ) from error
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return make_url(ADMIN_DATABASE_URL).set(database=name).render_as_string(hide_password=False)


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(asyncpg_dsn(ADMIN_DATABASE_URL), timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def check_redis() -> None:
    redis = Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        await redis.ping()
    except RedisError as error:
        raise ProofFailed(
            f"cannot reach Redis at {REDIS_URL}: {error}. Start it or set POCKETLLM_SCALE_OUT_REDIS_URL."
        ) from error
    finally:
        await redis.aclose()


async def delete_redis_keys() -> int:
    # NOTE: this deletes every key under the server's prefixes in this Redis database, so two runs of the
    # proof at once on the same database would disturb each other's rate-limit counts.
    redis = Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    deleted = 0
    try:
        for pattern in REDIS_KEY_PATTERNS:
            keys = [key async for key in redis.scan_iter(match=pattern, count=500)]
            if keys:
                deleted += await redis.delete(*keys)
    finally:
        await redis.aclose()
    return deleted


# -- the workload --------------------------------------------------------------------------------------------


@dataclass
class User:
    email: str
    user_id: str
    headers: dict[str, str]


@dataclass
class ChatRecord:
    chat_id: str
    user: User
    created_on: int
    sent: list[str]


@dataclass
class PostedJob:
    """An image job posted twice at once, to port A and port B, with one Idempotency-Key."""

    prompt: str
    user: User
    statuses: list[int]
    job_ids: list[str]


@dataclass
class Results:
    users: list[User] = field(default_factory=list)
    chats: list[ChatRecord] = field(default_factory=list)
    jobs: list[PostedJob] = field(default_factory=list)
    signin_statuses: list[int] = field(default_factory=list)
    signin_retry_after: list[str | None] = field(default_factory=list)
    limited_job_statuses: list[int] = field(default_factory=list)
    limited_job_ids: list[str] = field(default_factory=list)
    killed_worker: str = ""
    killed_worker_id: str = ""
    slow_job_id: str = ""
    interrupted_job_ids: set[str] = field(default_factory=set)
    killed_at: float = 0.0
    completed_before_kill: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    sign_out_reach_ms: float = 0.0


class Api:
    """HTTP clients for both API ports; request `index` goes to port `index % 2`."""

    def __init__(self, base_urls: list[str]) -> None:
        self.base_urls = base_urls
        self.clients = [httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_SECONDS) for url in base_urls]
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)

    async def request(self, index: int, method: str, path: str, **options: Any) -> httpx.Response:
        async with self._slots:
            return await self.clients[index % 2].request(method, path, **options)

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


def expect(response: httpx.Response, status: int, action: str) -> Any:
    if response.status_code != status:
        raise ProofFailed(f"{action}: expected {status}, got {response.status_code}: {response.text[:300]}")
    return response.json()


async def sign_up_user(api: Api, index: int, fake: FakeProvider, run_id: str) -> User:
    """Sign up on one port, then activate OpenAI at the fake provider and import a model on the other."""
    email = f"scale-out-{run_id}-{index}@example.com"
    body = expect(
        await api.request(index, "POST", "/v1/auth/signup", json={"email": email, "password": PASSWORD}),
        200,
        f"sign-up of {email}",
    )
    user = User(email, body["user"]["id"], {"Authorization": f"Bearer {body['tokens']['access_token']}"})
    activation = {"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake.openai_base_url}
    expect(
        await api.request(index + 1, "POST", "/v1/providers/activate", headers=user.headers, json=activation),
        200,
        f"provider activation of {email}",
    )
    expect(
        await api.request(
            index + 1,
            "POST",
            "/v1/models/import",
            headers=user.headers,
            json={"provider": "openai", "models": ["gpt-4o-mini"]},
        ),
        200,
        f"model import of {email}",
    )
    return user


async def run_chat(api: Api, user: User, chat_index: int) -> ChatRecord:
    """Create a chat on one port and send its messages one after another, alternating the ports."""
    created = expect(await api.request(chat_index, "POST", "/v1/chats", headers=user.headers, json={}), 200, "chat")
    record = ChatRecord(created["id"], user, chat_index % 2, [])
    for message_index in range(MESSAGES_PER_CHAT):
        content = f"message {message_index + 1} of chat {chat_index} from {user.email}"
        response = await api.request(
            chat_index + message_index + 1,
            "POST",
            f"/v1/chats/{record.chat_id}/messages",
            headers=user.headers,
            json={"content": content, "role": "user", "stream": False},
        )
        reply = expect(response, 200, f"message {message_index + 1} in chat {record.chat_id}")
        record.sent.append(content)
        if reply.get("role") != "assistant":
            raise ProofFailed(f"the response to a message in chat {record.chat_id} is not an assistant reply: {reply}")
    return record


async def post_job_twice(api: Api, user: User, prompt: str) -> PostedJob:
    """Post one image job to both ports at once with the same Idempotency-Key."""
    payload = {"job_type": "image_generation", "input_data": {"prompt": prompt, **IMAGE_MODEL}}
    headers = {**user.headers, "Idempotency-Key": f"scale-out-{uuid.uuid4().hex}"}
    responses = await asyncio.gather(
        *(api.request(port, "POST", "/v1/jobs/image-generation", headers=headers, json=payload) for port in (0, 1))
    )
    job_ids = [
        response.json().get("job_id", "") if response.status_code in (200, 202) else "" for response in responses
    ]
    return PostedJob(prompt, user, [response.status_code for response in responses], job_ids)


async def try_signins(api: Api, user: User, results: Results) -> None:
    """Sign in with a wrong password for one e-mail address, on both ports at once."""
    attempts = [
        api.request(index, "POST", "/v1/auth/signin", json={"email": user.email, "password": "wrong password"})
        for index in range(SIGNIN_ATTEMPTS)
    ]
    for response in await asyncio.gather(*attempts):
        results.signin_statuses.append(response.status_code)
        results.signin_retry_after.append(response.headers.get("Retry-After"))


async def post_limited_jobs(api: Api, user: User, run_id: str, results: Results) -> None:
    """Post more image jobs for one user than the per-user limit allows, on both ports at once."""
    attempts = [
        api.request(
            index,
            "POST",
            "/v1/jobs/image-generation",
            headers=user.headers,
            json={"input_data": {"prompt": f"scale-out {run_id} limited image {index}", **IMAGE_MODEL}},
        )
        for index in range(LIMITED_JOB_ATTEMPTS)
    ]
    for response in await asyncio.gather(*attempts):
        results.limited_job_statuses.append(response.status_code)
        if response.status_code == 202:
            results.limited_job_ids.append(response.json()["job_id"])


# -- the kill ------------------------------------------------------------------------------------------------


async def job_row(connection: asyncpg.Connection, job_id: str) -> asyncpg.Record:
    row = await connection.fetchrow("SELECT status, attempts, worker_id FROM jobs WHERE id = $1", uuid.UUID(job_id))
    if row is None:
        raise ProofFailed(f"job {job_id} is not in the jobs table")
    return row


async def completed_jobs_by_pid(connection: asyncpg.Connection) -> Counter[int]:
    rows = await connection.fetch(
        "SELECT worker_id, count(*) AS jobs FROM jobs "
        "WHERE status = 'completed' AND user_id IS NOT NULL GROUP BY worker_id"
    )
    return Counter({pid_of_worker_id(row["worker_id"]): row["jobs"] for row in rows})


async def kill_slow_job_holder(connection: asyncpg.Connection, workers: list[Child], results: Results) -> Child:
    """SIGKILL the worker running the slow job, once both workers have completed other image jobs."""
    row = await job_row(connection, results.slow_job_id)
    if row["worker_id"] is None:
        raise ProofFailed(f"the slow job has no worker: {dict(row)}")
    holder_pid = pid_of_worker_id(row["worker_id"])
    holder = next((worker for worker in workers if worker.pid == holder_pid), None)
    if holder is None:
        raise ProofFailed(f"the slow job is held by {row['worker_id']}, which is none of the started workers")

    # Completed jobs on both workers show that the workload is spread over them, and the kill still happens
    # while the rest of the workload runs. After the timeout the worker is killed anyway, and the check of
    # completed jobs per worker reports the uneven spread.
    deadline = time.monotonic() + REQUEST_TIMEOUT_SECONDS
    while True:
        completed = await completed_jobs_by_pid(connection)
        if all(completed[worker.pid] >= JOBS_PER_WORKER_BEFORE_KILL for worker in workers):
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    results.completed_before_kill = {worker.name: completed[worker.pid] for worker in workers}

    row = await job_row(connection, results.slow_job_id)
    if row["status"] != "processing" or row["attempts"] != 1 or pid_of_worker_id(row["worker_id"]) != holder_pid:
        raise ProofFailed(f"the slow job is no longer in its first attempt on {holder.name}: {dict(row)}")
    holder.process.send_signal(signal.SIGKILL)
    results.killed_at = time.time()
    await asyncio.to_thread(holder.process.wait, 10)
    results.killed_worker = holder.name
    results.killed_worker_id = row["worker_id"]
    # A claim that the worker committed just before it died becomes visible within moments. Its lease still
    # runs for over two seconds, so no other worker has taken these jobs over yet.
    await asyncio.sleep(0.5)
    interrupted = await connection.fetch(
        "SELECT id FROM jobs WHERE status = 'processing' AND worker_id = $1", row["worker_id"]
    )
    results.interrupted_job_ids = {str(record["id"]) for record in interrupted}
    return holder


async def start_slow_job(api: Api, fake: FakeProvider, user: User, run_id: str, results: Results) -> PostedJob:
    """Queue the job whose first provider call hangs, and wait until a worker has sent that call."""
    fake.fail_next("/images/generations", delay_seconds=SLOW_IMAGE_SECONDS)
    posted = await post_job_twice(api, user, f"scale-out {run_id} slow image")
    if sorted(posted.statuses) != [200, 202] or len(set(posted.job_ids)) != 1:
        raise ProofFailed(f"posting the slow job twice gave {posted.statuses} and job ids {posted.job_ids}")
    results.slow_job_id = posted.job_ids[0]
    try:
        await asyncio.to_thread(fake.wait_for_requests, "/images/generations", count=1, timeout=20)
    except TimeoutError:
        raise ProofFailed("no worker sent the slow job's image request within 20 s") from None
    return posted


# -- checks --------------------------------------------------------------------------------------------------


class Checks:
    """Collects failed checks, so that one run reports all of them."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def check(self, condition: bool, failure: str) -> None:
        if condition:
            self.passed += 1
        else:
            self.failures.append(failure)


async def check_chats(api: Api, fake: FakeProvider, results: Results, checks: Checks) -> None:
    """Read every chat back through the port that did not create it and compare it with what was sent."""

    async def read(record: ChatRecord) -> None:
        response = await api.request(
            record.created_on + 1, "GET", f"/v1/chats/{record.chat_id}", headers=record.user.headers
        )
        if response.status_code != 200:
            checks.check(False, f"chat {record.chat_id}: reading it gave {response.status_code}")
            return
        messages = response.json()["messages"]
        expected_roles = ["user", "assistant"] * MESSAGES_PER_CHAT
        checks.check(
            [message["sequence"] for message in messages] == list(range(1, len(expected_roles) + 1)),
            f"chat {record.chat_id}: sequence numbers are {[message['sequence'] for message in messages]}",
        )
        checks.check(
            [message["role"] for message in messages] == expected_roles,
            f"chat {record.chat_id}: roles are {[message['role'] for message in messages]}",
        )
        checks.check(
            [message["content"] for message in messages if message["role"] == "user"] == record.sent,
            f"chat {record.chat_id}: the user messages differ from the ones sent",
        )
        checks.check(
            all(
                message["content"] == DEFAULT_REPLY_TEXT and message["status"] == "complete"
                for message in messages
                if message["role"] == "assistant"
            ),
            f"chat {record.chat_id}: a reply is not the provider's complete reply",
        )

    await asyncio.gather(*(read(record) for record in results.chats))
    expected_user_messages = USERS * CHATS_PER_USER * MESSAGES_PER_CHAT
    checks.check(
        len(results.chats) == USERS * CHATS_PER_USER,
        f"{len(results.chats)} chats were created, expected {USERS * CHATS_PER_USER}",
    )
    completions = len(fake.requests_to("/chat/completions"))
    checks.check(
        completions == expected_user_messages,
        f"the provider received {completions} chat requests for {expected_user_messages} user messages",
    )


async def check_chat_rows(connection: asyncpg.Connection, results: Results, checks: Checks) -> None:
    user_ids = [uuid.UUID(user.user_id) for user in results.users]
    chats = await connection.fetchval("SELECT count(*) FROM chats WHERE user_id = ANY($1)", user_ids)
    messages = await connection.fetchval(
        "SELECT count(*) FROM messages JOIN chats ON chats.id = messages.chat_id WHERE chats.user_id = ANY($1)",
        user_ids,
    )
    expected_messages = USERS * CHATS_PER_USER * MESSAGES_PER_CHAT * 2
    checks.check(
        chats == USERS * CHATS_PER_USER, f"the database holds {chats} chats, expected {USERS * CHATS_PER_USER}"
    )
    checks.check(messages == expected_messages, f"the database holds {messages} messages, expected {expected_messages}")


def check_posted_jobs(results: Results, checks: Checks) -> None:
    for posted in results.jobs:
        checks.check(
            sorted(posted.statuses) == [200, 202],
            f"job {posted.prompt!r}: posting it to both ports gave {posted.statuses}, expected one 202 and one 200",
        )
        checks.check(
            len(set(posted.job_ids)) == 1 and posted.job_ids[0] != "",
            f"job {posted.prompt!r}: the two posts returned the job ids {posted.job_ids}",
        )


async def wait_for_jobs(connection: asyncpg.Connection, job_ids: list[uuid.UUID]) -> None:
    deadline = time.monotonic() + JOBS_FINISH_TIMEOUT_SECONDS
    while True:
        active = await connection.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1) AND status IN ('pending', 'processing')", job_ids
        )
        if active == 0:
            return
        if time.monotonic() > deadline:
            raise ProofFailed(f"{active} image jobs did not finish within {JOBS_FINISH_TIMEOUT_SECONDS:g} s")
        await asyncio.sleep(0.25)


async def check_job_rows(
    connection: asyncpg.Connection, fake: FakeProvider, results: Results, survivor: Child, checks: Checks
) -> list[str]:
    """Check each job's row against the provider's requests. Returns the ids of the completed jobs."""
    user_ids = [uuid.UUID(user.user_id) for user in results.users]
    rows = await connection.fetch(
        "SELECT id, status, attempts, worker_id, input_data, output_data, finished_at "
        "FROM jobs WHERE user_id = ANY($1)",
        user_ids,
    )
    expected_jobs = IMAGE_JOBS + JOBS_PER_USER_LIMIT
    checks.check(len(rows) == expected_jobs, f"the database holds {len(rows)} image jobs, expected {expected_jobs}")
    posted_ids = {job.job_ids[0] for job in results.jobs} | set(results.limited_job_ids)
    checks.check({str(row["id"]) for row in rows} == posted_ids, "the jobs in the database differ from the jobs posted")

    provider_calls = Counter(record.body.get("prompt") for record in fake.requests_to("/images/generations"))
    completed: list[str] = []
    for row in rows:
        job_id = str(row["id"])
        prompt = json.loads(row["input_data"])["prompt"]
        output = json.loads(row["output_data"]) if row["output_data"] is not None else {}
        calls = provider_calls[prompt]
        if row["status"] != "completed":
            checks.check(False, f"job {job_id} ({prompt!r}) ended {row['status']}")
            continue
        completed.append(job_id)
        checks.check(len(output.get("images", [])) == 1, f"job {job_id}: {len(output.get('images', []))} images stored")
        if job_id in results.interrupted_job_ids:
            # The killed worker may have died before or after sending its request to the provider.
            checks.check(row["attempts"] == 2, f"interrupted job {job_id}: {row['attempts']} attempts, expected 2")
            checks.check(calls in (1, 2), f"interrupted job {job_id}: the provider was asked {calls} times")
            checks.check(
                pid_of_worker_id(row["worker_id"]) != pid_of_worker_id(results.killed_worker_id),
                f"interrupted job {job_id}: completed by the killed worker",
            )
        else:
            checks.check(row["attempts"] == 1, f"job {job_id}: {row['attempts']} attempts, expected 1")
            checks.check(calls == 1, f"job {job_id} ({prompt!r}): the provider was asked {calls} times, expected 1")

    slow = next((row for row in rows if str(row["id"]) == results.slow_job_id), None)
    checks.check(slow is not None and slow["status"] == "completed", "the slow job did not complete")
    if slow is not None:
        slow_prompt = json.loads(slow["input_data"])["prompt"]
        checks.check(slow["attempts"] == 2, f"the slow job took {slow['attempts']} attempts, expected 2")
        checks.check(
            provider_calls[slow_prompt] == 2,
            f"the provider was asked {provider_calls[slow_prompt]} times for the slow job, expected 2",
        )
        checks.check(
            slow["worker_id"] is not None and pid_of_worker_id(slow["worker_id"]) == survivor.pid,
            f"the slow job was completed by {slow['worker_id']}, not by {survivor.name} (pid {survivor.pid})",
        )
        if slow["finished_at"] is not None:
            results.timings["slow job completed after the kill"] = slow["finished_at"].timestamp() - results.killed_at
    checks.check(
        results.slow_job_id in results.interrupted_job_ids, "the slow job was not held by the worker that was killed"
    )
    checks.check(
        all(count >= JOBS_PER_WORKER_BEFORE_KILL for count in results.completed_before_kill.values()),
        f"image jobs completed per worker before the kill: {results.completed_before_kill}, expected at least "
        f"{JOBS_PER_WORKER_BEFORE_KILL} each",
    )
    return completed


async def check_images(api: Api, job_rows: list[tuple[str, User]], checks: Checks) -> None:
    """Load each job's image through the URL that one port returns, and through the same path on the other."""

    async def load(index: int, job_id: str, user: User) -> None:
        job = expect(await api.request(index, "GET", f"/v1/jobs/{job_id}", headers=user.headers), 200, f"job {job_id}")
        url = job["output_data"]["images"][0]["url"]
        own = await api.request(index, "GET", url)
        other_base = urlsplit(api.base_urls[(index + 1) % 2])
        other_url = urlunsplit(urlsplit(url)._replace(scheme=other_base.scheme, netloc=other_base.netloc))
        other = await api.request(index + 1, "GET", other_url)
        checks.check(own.status_code == 200, f"job {job_id}: its image URL gave {own.status_code}")
        checks.check(
            other.status_code == 200, f"job {job_id}: its image URL on the other port gave {other.status_code}"
        )
        checks.check(own.content.startswith(b"\x89PNG"), f"job {job_id}: the stored image is not a PNG file")
        checks.check(own.content == other.content, f"job {job_id}: the two ports returned different image bytes")

    await asyncio.gather(*(load(index, job_id, user) for index, (job_id, user) in enumerate(job_rows)))


def check_rate_limits(results: Results, checks: Checks) -> None:
    signin = Counter(results.signin_statuses)
    checks.check(
        signin == Counter({401: SIGNIN_PER_EMAIL_LIMIT, 429: SIGNIN_ATTEMPTS - SIGNIN_PER_EMAIL_LIMIT}),
        f"wrong-password sign-ins for one e-mail over both ports gave {dict(signin)}, expected "
        f"{SIGNIN_PER_EMAIL_LIMIT} x 401 and {SIGNIN_ATTEMPTS - SIGNIN_PER_EMAIL_LIMIT} x 429",
    )
    limited = [
        retry_after
        for status, retry_after in zip(results.signin_statuses, results.signin_retry_after, strict=True)
        if status == 429
    ]
    checks.check(
        all(value is not None and value.isdigit() and int(value) >= 1 for value in limited),
        f"a 429 sign-in answer lacks a valid Retry-After header: {limited}",
    )
    jobs = Counter(results.limited_job_statuses)
    checks.check(
        jobs == Counter({202: JOBS_PER_USER_LIMIT, 429: LIMITED_JOB_ATTEMPTS - JOBS_PER_USER_LIMIT}),
        f"image job posts of one user over both ports gave {dict(jobs)}, expected {JOBS_PER_USER_LIMIT} x 202 "
        f"and {LIMITED_JOB_ATTEMPTS - JOBS_PER_USER_LIMIT} x 429",
    )


async def check_sign_out_reach(api: Api, run_id: str, results: Results, checks: Checks) -> None:
    """Sign out on port A a session that port B has just checked, then read through port B until it is rejected."""
    email = f"scale-out-{run_id}-sign-out@example.com"
    body = expect(
        await api.request(0, "POST", "/v1/auth/signup", json={"email": email, "password": PASSWORD}),
        200,
        f"sign-up of {email}",
    )
    headers = {"Authorization": f"Bearer {body['tokens']['access_token']}"}
    for _ in range(2):
        expect(await api.request(1, "GET", "/v1/users/profile", headers=headers), 200, "profile on port B")
    expect(await api.request(0, "POST", "/v1/auth/signout", headers=headers), 200, "sign-out on port A")

    started = time.monotonic()
    status = 200
    while status == 200 and time.monotonic() - started < SIGN_OUT_REACH_SECONDS:
        status = (await api.request(1, "GET", "/v1/users/profile", headers=headers)).status_code
    results.sign_out_reach_ms = (time.monotonic() - started) * 1000
    checks.check(
        status == 401,
        f"port B still accepted a session signed out through port A after {SIGN_OUT_REACH_SECONDS:g} s "
        f"(last status {status})",
    )


def check_logs(children: list[Child], killed: Child | None, checks: Checks) -> None:
    for child in children:
        if child is killed:
            continue
        checks.check("Traceback" not in child.log_text(), f"{child.name} logged a traceback (see its log)")


# -- the run -------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)


async def gather_all(steps: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run the steps concurrently in a task group, so that one failure cancels the rest."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(step) for step in steps]
    return [task.result() for task in tasks]


async def timed(results: Results, name: str, step: Awaitable[Any]) -> Any:
    started = time.monotonic()
    value = await step
    results.timings[name] = time.monotonic() - started
    return value


async def run_workload(
    api: Api, fake: FakeProvider, connection: asyncpg.Connection, workers: list[Child], run_id: str, clock: Clock
) -> tuple[Results, Child]:
    results = Results()
    sign_ups = [sign_up_user(api, index, fake, run_id) for index in range(USERS)]
    results.users = await timed(results, "sign-ups", gather_all(sign_ups))
    limit_user = await sign_up_user(api, USERS, fake, run_id)
    clock.say(f"signed up {USERS + 1} users over both ports")

    results.jobs.append(await start_slow_job(api, fake, results.users[0], run_id, results))
    clock.say(f"the slow image job {results.slow_job_id} is running; starting the mixed workload")

    chats = [
        run_chat(api, user, user_index * CHATS_PER_USER + chat_index)
        for user_index, user in enumerate(results.users)
        for chat_index in range(CHATS_PER_USER)
    ]
    jobs = [
        post_job_twice(api, results.users[index % USERS], f"scale-out {run_id} image {index}")
        for index in range(1, IMAGE_JOBS)
    ]
    started = time.monotonic()
    # A TaskGroup cancels the other parts of the workload as soon as one of them fails.
    async with asyncio.TaskGroup() as group:
        chat_task = group.create_task(gather_all(chats))
        job_task = group.create_task(gather_all(jobs))
        group.create_task(try_signins(api, results.users[1], results))
        group.create_task(post_limited_jobs(api, limit_user, run_id, results))
        kill_task = group.create_task(kill_slow_job_holder(connection, workers, results))
    results.timings["mixed workload"] = time.monotonic() - started
    results.chats = chat_task.result()
    results.jobs.extend(job_task.result())
    killed = kill_task.result()
    results.users.append(limit_user)
    clock.say(
        f"mixed workload done: {len(results.chats)} chats; {killed.name} (pid {killed.pid}) was killed with "
        f"SIGKILL holding {len(results.interrupted_job_ids)} job(s)"
    )
    return results, killed


@dataclass
class Resources:
    """The processes, servers, database and clients that the proof started, for the cleanup to stop and remove."""

    fake: FakeProvider = field(default_factory=FakeProvider)
    children: list[Child] = field(default_factory=list)
    database_name: str = ""
    database_created: bool = False
    connection: asyncpg.Connection | None = None
    api: Api | None = None
    redis_reachable: bool = False


async def start_processes(resources: Resources, directory: Path, clock: Clock) -> tuple[str, list[Child]]:
    """Create the database, migrate it, and start both API processes and both workers. Returns the database
    URL and the workers."""
    await check_redis()
    resources.redis_reachable = True
    database_url = await create_database(resources.database_name)
    resources.database_created = True
    clock.say(f"created database {resources.database_name}; data directory {directory}")
    resources.fake.start()
    environment = child_environment(
        database_url, directory / "data", secrets.token_urlsafe(48), Fernet.generate_key().decode()
    )
    resources.children.append(await run_migrations(environment, directory))
    clock.say("applied the migrations once with `pocketllm migrate`")

    ports = [free_port(), free_port()]
    api_urls = {f"api-{name}": f"http://127.0.0.1:{port}" for name, port in zip("ab", ports, strict=True)}
    for name, port in zip(api_urls, ports, strict=True):
        arguments = ["serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port)]
        resources.children.append(start_child(name, arguments, environment, directory))
    workers = [
        start_child(name, ["worker", "--concurrency", str(WORKER_CONCURRENCY)], environment, directory)
        for name in ("worker-1", "worker-2")
    ]
    resources.children.extend(workers)
    await wait_until_ready(resources.children[1:], api_urls)
    clock.say(
        f"API processes on ports {ports[0]} and {ports[1]}; workers with pid {workers[0].pid} and {workers[1].pid}"
    )
    resources.api = Api(list(api_urls.values()))
    return database_url, workers


async def run_proof(resources: Resources, directory: Path, clock: Clock, checks: Checks) -> None:
    database_url, workers = await start_processes(resources, directory, clock)
    api, fake = resources.api, resources.fake
    assert api is not None
    connection = resources.connection = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
    run_id = resources.database_name.rsplit("_", 1)[-1]
    results, killed = await run_workload(api, fake, connection, workers, run_id, clock)
    survivor = next(worker for worker in workers if worker is not killed)

    job_ids = [uuid.UUID(job.job_ids[0]) for job in results.jobs if job.job_ids[0]]
    job_ids += [uuid.UUID(job_id) for job_id in results.limited_job_ids]
    started = time.monotonic()
    await wait_for_jobs(connection, job_ids)
    results.timings["jobs finished after the workload"] = time.monotonic() - started
    clock.say("every image job has finished; checking the results")

    check_posted_jobs(results, checks)
    check_rate_limits(results, checks)
    await check_chats(api, fake, results, checks)
    await check_chat_rows(connection, results, checks)
    completed = await check_job_rows(connection, fake, results, survivor, checks)
    owners = {job.job_ids[0]: job.user for job in results.jobs}
    owners |= {job_id: results.users[-1] for job_id in results.limited_job_ids}
    await check_images(api, [(job_id, owners[job_id]) for job_id in completed], checks)
    await check_sign_out_reach(api, run_id, results, checks)
    check_logs(resources.children, killed, checks)
    print_summary(results, fake, checks, clock, killed)


def leaf_exceptions(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves.extend(leaf_exceptions(error) if isinstance(error, BaseExceptionGroup) else [error])
    return leaves


async def clean_up(resources: Resources, clock: Clock) -> None:
    """Stop the fake provider, drop the database and delete the Redis keys, and print what could not be removed."""
    if resources.api is not None:
        await resources.api.close()
    if resources.connection is not None:
        await resources.connection.close()
    resources.fake.stop()
    if resources.database_created:
        try:
            await drop_database(resources.database_name)
            clock.say(f"dropped database {resources.database_name}")
        except (OSError, asyncpg.PostgresError) as error:
            print(f"could not drop database {resources.database_name}: {error}. Drop it by hand.", file=sys.stderr)
    if resources.redis_reachable:
        try:
            clock.say(f"deleted {await delete_redis_keys()} Redis keys in {REDIS_URL}")
        except RedisError as error:
            print(f"could not delete the Redis keys in {REDIS_URL}: {error}", file=sys.stderr)


async def prove(directory: Path, clock: Clock) -> int:
    resources = Resources(database_name=f"pocketllm_scaleout_{secrets.token_hex(4)}")
    checks = Checks()
    try:
        async with asyncio.timeout(OVERALL_TIMEOUT_SECONDS):
            await run_proof(resources, directory, clock, checks)
    except* ProofFailed as group:
        checks.failures.extend(str(error) for error in leaf_exceptions(group))
    except* TimeoutError as group:
        checks.failures.extend(
            f"timed out: {error}" if str(error) else f"the proof did not finish within {OVERALL_TIMEOUT_SECONDS:g} s"
            for error in leaf_exceptions(group)
        )
    except* (httpx.HTTPError, OSError, asyncpg.PostgresError, RedisError) as group:
        checks.failures.extend(f"{type(error).__name__}: {error}" for error in leaf_exceptions(group))
    except* Exception as group:
        # A bug in the proof itself: show where, and still stop the processes and print their logs.
        traceback.print_exception(group)
        checks.failures.append("the proof raised an unexpected error (traceback above)")
    finally:
        # Children run on after a failure until this stops them, so their logs are complete when printed.
        stop_children(resources.children)
        if checks.failures:
            print_failures(checks, resources.children)
        await clean_up(resources, clock)
    return 1 if checks.failures else 0


def print_summary(results: Results, fake: FakeProvider, checks: Checks, clock: Clock, killed: Child) -> None:
    messages = sum(len(record.sent) for record in results.chats) * 2
    print(
        f"\nscale-out proof: {len(results.users)} users, {len(results.chats)} chats with {messages} messages, "
        f"{len(results.jobs) + len(results.limited_job_ids)} image jobs "
        f"({len(fake.requests_to('/images/generations'))} provider image calls), "
        f"{killed.name} killed mid-job, {checks.passed} checks passed, {len(checks.failures)} failed"
    )
    print(f"  image jobs completed per worker before the kill: {results.completed_before_kill}")
    print(f"  jobs the killed worker held: {len(results.interrupted_job_ids)}, each completed by the other worker")
    for name, seconds in results.timings.items():
        print(f"  {name}: {seconds:.1f} s")
    print(f"  a sign-out through port A was rejected by port B after {results.sign_out_reach_ms:.1f} ms")
    print(f"  total so far: {clock.elapsed():.1f} s")


def print_failures(checks: Checks, children: list[Child]) -> None:
    print(f"\nscale-out proof FAILED: {len(checks.failures)} problem(s)", file=sys.stderr)
    for failure in checks.failures[:50]:
        print(f"  - {failure}", file=sys.stderr)
    if len(checks.failures) > 50:
        print(f"  ... and {len(checks.failures) - 50} more", file=sys.stderr)
    for child in children:
        print(f"\n--- last lines of {child.log_path} ---\n{child.log_tail()}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-data", action="store_true", help="keep the temporary directory with the logs")
    arguments = parser.parse_args()

    clock = Clock()
    directory = Path(tempfile.mkdtemp(prefix="pocketllm-scale-out-"))
    try:
        return asyncio.run(prove(directory, clock))
    finally:
        if arguments.keep_data:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
