"""Fencing: at most one run commits a given ``(output, dt)`` at a time, enforced by the store.

The lock is ``<output>/_staging/_locks/dt=<date>.json`` and names its owner's run id.

- **S3**: created with a conditional write (``If-None-Match: *``), which the store refuses to a
  second creator. It carries a lease: the owner renews it every ``lease_s / 3`` with a PUT
  ``If-Match`` its own ETag. A lock whose lease ran out (its owner died) is taken over with a PUT
  ``If-Match`` the ETag that was read, so of two runs racing for it exactly one wins. Expiry is
  judged with the store's own clock (the lock's ``Last-Modified`` against the ``Date`` of the
  response that read it), never a comparison of two machines' clocks.
- **Local**: an exclusive ``flock`` on the lock file, which the OS drops when its process dies,
  so no lease is needed; the file records the owner for the messages.

A second run fails fast (:class:`LockHeld`, exit 2), or waits with ``--wait-for-lock``.
Recovery rolls an intent forward only after taking the lock of its date (:func:`try_lock`), so
it never races a live owner.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from emotion_core import storage

LOCKS = "_staging/_locks"


class LockHeld(RuntimeError):
    """Another live run holds the lock."""


class PartitionLock:
    """The commit lock of ``(output, date)`` for ``run_id`` (module doc). A context manager."""

    def __init__(self, output: str, date: str, run_id: str, lease_s: float = 900.0):
        self.uri = storage.join(output, LOCKS, f"dt={date}.json")
        self.run_id, self.lease_s = run_id, lease_s
        self.is_s3 = storage.is_s3(output)
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.storage_now = time.time()  # the store's clock when the lock was taken (S3: its Date header)

    # -- acquire / release ---------------------------------------------------------------------

    def acquire(self, wait: bool = False, poll_s: float = 5.0, timeout_s: float | None = None) -> PartitionLock:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                self._acquire_s3() if self.is_s3 else self._acquire_local()
                return self
            except LockHeld:
                if not wait or (deadline is not None and time.monotonic() > deadline):
                    raise
                time.sleep(poll_s)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        if self.is_s3 and self._etag:
            loc = storage.parse(self.uri)
            try:
                storage.s3_client().delete_object(Bucket=loc.bucket, Key=loc.key, IfMatch=self._etag)
            except Exception:  # noqa: BLE001 - taken over after our lease expired: not ours to delete
                pass
            self._etag = None
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> PartitionLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local ---------------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        path = storage.parse(self.uri).path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(os.pread(fd, 4096, 0))
            os.close(fd)
            raise LockHeld(f"run {owner} is committing {self.uri} now") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._body(), 0)
        self._fd = fd

    # -- S3 ------------------------------------------------------------------------------------

    def _acquire_s3(self) -> None:
        loc = storage.parse(self.uri)
        client = storage.s3_client()
        try:
            r = client.put_object(Bucket=loc.bucket, Key=loc.key, Body=self._body(), IfNoneMatch="*")
            self._etag, self.storage_now = r["ETag"], _date(r)
        except Exception as e:  # noqa: BLE001 - PreconditionFailed: someone holds it; see whose and if it expired
            if _code(e) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise
            owner, etag, expired = self._read_s3(client, loc)
            if etag is None:  # released between our PUT and GET: try again
                return self._acquire_s3()
            if not expired:
                raise LockHeld(f"run {owner} is committing {self.uri} now (lease renewed within "
                               f"{self.lease_s:.0f} s)") from None
            try:  # take over the dead owner's lock; of two racers only one PUT matches
                r = client.put_object(Bucket=loc.bucket, Key=loc.key, Body=self._body(), IfMatch=etag)
                self._etag, self.storage_now = r["ETag"], _date(r)
            except Exception as e2:  # noqa: BLE001
                if _code(e2) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey"):
                    raise LockHeld(f"another run took over the expired lock {self.uri}") from None
                raise
        self._renewer = threading.Thread(target=self._renew, name="lock-renewer", daemon=True)
        self._renewer.start()

    def _read_s3(self, client, loc) -> tuple[str, str | None, bool]:
        try:
            r = client.get_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as e:  # noqa: BLE001
            if _code(e) in ("NoSuchKey", "404"):
                return "?", None, False
            raise
        body = r["Body"].read()
        lease = float(json.loads(body or b"{}").get("lease_s", self.lease_s))
        age = _date(r) - r["LastModified"].timestamp()
        return _owner(body), r["ETag"], age > lease

    def _renew(self) -> None:
        loc = storage.parse(self.uri)
        client = storage.s3_client()
        while not self._stop.wait(self.lease_s / 3):
            try:
                self._etag = client.put_object(Bucket=loc.bucket, Key=loc.key, Body=self._body(),
                                               IfMatch=self._etag)["ETag"]
            except Exception:  # noqa: BLE001 - lost it (lease expired and taken over): stop renewing
                return

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "lease_s": self.lease_s, "host": os.uname().nodename,
                           "pid": os.getpid(), "at": datetime.now(UTC).isoformat(timespec="seconds")}).encode()


def try_lock(output: str, date: str, run_id: str) -> PartitionLock | None:
    """The lock of ``(output, date)`` if it is free (or its owner is dead), else None."""
    try:
        return PartitionLock(output, date, run_id).acquire()
    except LockHeld:
        return None


def _date(response: dict) -> float:
    """The store's clock: the Date header of an S3 response."""
    return parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"]).timestamp()


def _owner(body: bytes) -> str:
    try:
        return str(json.loads(body.decode() or "{}").get("run_id", "?"))
    except ValueError:
        return "?"


def _code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
