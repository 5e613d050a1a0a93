"""The commit fence of jobs.label (jobs/_label_lock.py): one run per (output, dt), enforced by the
store: flock locally (a killed owner releases it), S3 conditional writes with a lease (moto's S3
server), takeover of a dead owner's lease by exactly one run, waiting for a lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from jobs._label_lock import LockHeld, PartitionLock

DATE = "2024-05-01"


def test_local_lock_is_exclusive_and_released(tmp_path):
    out = str(tmp_path / "labels")
    first = PartitionLock(out, DATE, "run-a").acquire()
    with pytest.raises(LockHeld, match="run run-a is committing"):
        PartitionLock(out, DATE, "run-b").acquire()
    PartitionLock(out, "2024-05-02", "run-c").acquire().release()  # other dates are independent
    first.release()
    PartitionLock(out, DATE, "run-b").acquire().release()


def test_local_lock_of_a_killed_run_is_free(tmp_path):
    out = str(tmp_path / "labels")
    code = (f"from jobs._label_lock import PartitionLock; PartitionLock({out!r}, {DATE!r}, 'dead').acquire(); "
            "print('held', flush=True); import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld, match="run dead"):
        PartitionLock(out, DATE, "alive").acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    PartitionLock(out, DATE, "alive").acquire().release()


def test_s3_lock_conditional_write_lease_and_takeover(s3_bucket):
    out = f"s3://{s3_bucket}/labels"
    first = PartitionLock(out, DATE, "run-a", lease_s=2).acquire()
    with pytest.raises(LockHeld, match="run run-a"):
        PartitionLock(out, DATE, "run-b", lease_s=2).acquire()
    time.sleep(3)  # the owner is alive: it renewed its lease, so the lock still holds
    with pytest.raises(LockHeld):
        PartitionLock(out, DATE, "run-b", lease_s=2).acquire()
    first._stop.set()  # the owner dies: no more renewals, no release
    first._renewer.join()
    time.sleep(3)
    racers = [PartitionLock(out, DATE, f"racer-{i}", lease_s=2) for i in range(2)]
    won = []
    for r in racers:
        try:
            won.append(r.acquire())
        except LockHeld:
            pass
    assert len(won) == 1  # exactly one takes the dead owner's lease over
    first.release()  # the dead owner's late release must not delete the new owner's lock
    with pytest.raises(LockHeld, match=won[0].run_id):
        PartitionLock(out, DATE, "run-c", lease_s=2).acquire()
    won[0].release()
    PartitionLock(out, DATE, "run-c").acquire().release()


def test_wait_for_lock(tmp_path):
    out = str(tmp_path / "labels")
    holder = PartitionLock(out, DATE, "slow").acquire()
    threading.Timer(1.0, holder.release).start()
    t0 = time.monotonic()
    PartitionLock(out, DATE, "patient").acquire(wait=True, poll_s=0.2, timeout_s=30).release()
    assert time.monotonic() - t0 >= 0.9
