"""A real S3-compatible server on loopback for the tests (and ``bench.s3_read``): moto's server.

``python tests/s3_server.py`` runs moto's threaded server on a free port of 127.0.0.1 and prints
the port; :func:`start_moto` starts it as a subprocess, creates an IAM user with an access key
allowed ``s3:*`` and a bucket, then switches authentication on, so requests with other
credentials are refused as by AWS (wrong credentials can be tested). The ``s3_server`` fixture
(one per session) and ``s3_env`` (per test: credentials and ``AWS_ENDPOINT_URL`` in the
environment, and a fresh prefix) build on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BUCKET = "lst-test"
REGION = "us-east-1"

# environment variables that would point botocore elsewhere than the test server
_AWS_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "LST_CACHE_ROOT",
)


@dataclass
class MotoS3:
    """A running moto server: its endpoint, the one user's credentials and the bucket."""

    endpoint: str
    key: str
    secret: str
    bucket: str
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to use the bucket (botocore reads these)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, service: str = "s3", **kw: Any) -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id=kw.pop("key", self.key),
            aws_secret_access_key=kw.pop("secret", self.secret),
            region_name=REGION,
            **kw,
        )

    def keys(self, prefix: str) -> list[str]:
        """Every object name under ``prefix`` of the bucket."""
        out: list[str] = []
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        for page in pages:
            out.extend(o["Key"] for o in page.get("Contents", []))
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _post(url: str, body: bytes) -> bytes:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def start_moto(bucket: str = BUCKET, timeout: float = 60.0) -> MotoS3:
    """Start moto's server in a subprocess on a free loopback port, with a user and a bucket."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve())],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.time() + timeout
    line = proc.stdout.readline().strip()  # the server prints its port once it listens
    if not line.isdigit():
        proc.kill()
        raise RuntimeError(f"moto server did not start (printed {line!r})")
    endpoint = f"http://127.0.0.1:{int(line)}"
    setup = MotoS3(endpoint, "setup", "setup", bucket, proc)
    while True:  # authentication is off until the user exists: any credentials work here
        try:
            iam = setup.client("iam")
            iam.create_user(UserName="lst-tester")
            break
        except Exception:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    key = iam.create_access_key(UserName="lst-tester")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(
        UserName="lst-tester", PolicyName="s3-all", PolicyDocument=json.dumps(policy)
    )
    setup.client().create_bucket(Bucket=bucket)
    _post(f"{endpoint}/moto-api/reset-auth", b"0")  # from now on every request is checked
    return MotoS3(endpoint, key["AccessKeyId"], key["SecretAccessKey"], bucket, proc)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class S3Env:
    """One test's view of the server: a fresh prefix, with credentials in the environment."""

    server: MotoS3
    prefix: str

    @property
    def root(self) -> str:
        return f"s3://{self.server.bucket}/{self.prefix}"

    def sub(self, name: str) -> str:
        return f"{self.root}/{name}"


@pytest.fixture
def s3_env(s3_server: MotoS3, monkeypatch: pytest.MonkeyPatch) -> S3Env:
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in s3_server.env().items():
        monkeypatch.setenv(var, value)
    return S3Env(s3_server, f"t-{uuid.uuid4().hex[:10]}")


def _serve() -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
    _serve()
