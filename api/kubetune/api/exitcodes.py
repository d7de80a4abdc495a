"""Process exit codes shared by the trainer and the operator.

The operator's Job `podFailurePolicy` turns `CONFIG_ERROR_EXIT_CODE` into an immediate,
non-retried failure, so the trainer must exit with exactly this value when the job can
never succeed (bad spec, unreadable model, missing data). This module imports nothing,
so the trainer can import it without pulling in the operator.
"""

OK = 0
FAILURE = 1
"""Anything that might succeed on a retry (lost node, network, out of memory)."""

CONFIG_ERROR_EXIT_CODE = 78
"""EX_CONFIG from sysexits.h: retrying cannot help; the Job fails at once."""

INTERRUPTED = 143
"""128 + SIGTERM: every rank stopped at one agreed step after a complete checkpoint (preemption,
suspend, drain), or the pod was stopped before training began. Retryable; a disruption."""

PEER_LOST = 76
"""EX_PROTOCOL from sysexits.h: a collective failed because another rank's process is gone (its
connections closed) or did not arrive within `runPolicy.processGroupTimeoutSeconds`. The cause is
on another pod; retryable (the whole group restarts from the newest complete checkpoint)."""
