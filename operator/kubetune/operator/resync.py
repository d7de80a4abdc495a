"""Passes outside Kopf's handlers: on a child Job's change, on retry, and every `resync_seconds`.

Each asks the work queue for a pass of one FineTuneJob; a few workers run them, reading
the FineTuneJob from the informer's cache, so a burst of events becomes one pass and a
slow rank 0 holds up only its own job. The periodic round also re-reads rank 0's
`/progress`. It is a loop of the operator's own rather than a Kopf timer: Kopf puts a
finalizer on every object that has a timer, so FineTuneJobs could not be deleted while
the operator is down, and each deletion would wait for a running timer to notice. The
cache lists again whenever its watch expires, so a missed event is picked up too.
"""

from __future__ import annotations

import logging
import threading

import kopf

from kubetune.operator.handlers import RETRY_DELAY_SECONDS, run_pass
from kubetune.operator.informer import Key, key_of

LOG = logging.getLogger(__name__)
IDLE_SECONDS = 1.0
YIELD_SECONDS = 5.0


def pass_once(key: Key, memo: kopf.Memo) -> bool:
    """Reconcile one FineTuneJob from the cache (gone: nothing to do); on an error, retry later.

    A job that already has its Job waits (at most `YIELD_SECONDS`, half a resync period) while other jobs' children
    are being created: in a burst of new jobs their Jobs come first, and the status changes
    that pile up meanwhile go out as one write instead of several.
    """
    if memo.caches["Job"].labelled(*key):
        memo.cluster.quiet(YIELD_SECONDS)
    body = memo.caches["FineTuneJob"].get(*key)
    if body is None:
        return True
    try:
        run_pass(body, memo, LOG)
    except kopf.TemporaryError as exc:
        LOG.warning("%s/%s: %s", *key, exc)
        memo.queue.add_after(key, exc.delay or RETRY_DELAY_SECONDS)
        return False
    except Exception:  # a worker that died would leave the queue to fewer and fewer workers
        LOG.exception("%s/%s: the pass failed; retrying in %.0fs", *key, RETRY_DELAY_SECONDS)
        memo.queue.add_after(key, RETRY_DELAY_SECONDS)
        return False
    return True


def work(memo: kopf.Memo, stop: threading.Event) -> None:
    """One worker: passes from the queue until `stop` is set."""
    while not stop.is_set():
        key = memo.queue.get(timeout=IDLE_SECONDS)
        if key is None:
            continue
        try:
            pass_once(key, memo)
        finally:
            memo.queue.done(key)


def queue_every_job(memo: kopf.Memo) -> int:
    bodies = memo.caches["FineTuneJob"].items()
    for body in bodies:
        memo.queue.add(key_of(body))
    return len(bodies)


def resync_forever(memo: kopf.Memo, stop: threading.Event) -> None:
    """Every `resync_seconds` until `stop` is set."""
    while not stop.wait(memo.settings.resync_seconds):
        queue_every_job(memo)


def start_passes(memo: kopf.Memo, stop: threading.Event) -> list[threading.Thread]:
    """The queue's workers and the resync loop, as daemon threads."""
    targets = [("kubetune-resync", resync_forever)]
    targets += [(f"kubetune-pass-{n}", work) for n in range(memo.settings.resync_workers)]
    threads = [threading.Thread(target=target, args=(memo, stop), name=name, daemon=True) for name, target in targets]
    for thread in threads:
        thread.start()
    return threads
