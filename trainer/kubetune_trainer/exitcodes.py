"""Exit codes of the trainer and the errors that carry them: the contract with the operator.

The operator decides from the exit code whether a failed pod is worth a restart: a
configuration error (bad spec, missing data, rejected credentials) fails the same way
every time, so it is not retried; anything else may be transient and is. The codes the
operator acts on come from `kubetune.api.exitcodes`, the one place both sides read.

In a multi-process run every process ends with one of these codes, and so does every pod's
launcher (see `launch`): 143 on every rank after an agreed stop (a stop signal reached any rank;
all ranks checkpointed the same step), 76 on a rank whose collective failed because a peer is
gone (prompt: the peer's closed connection fails the collective at once) or stayed away longer
than the process-group timeout, 78 for a configuration error on any rank.
"""

from __future__ import annotations

from kubetune.api.exitcodes import CONFIG_ERROR_EXIT_CODE, FAILURE, INTERRUPTED, OK, PEER_LOST

EXIT_OK = OK
EXIT_FAILED = FAILURE
"""Unexpected error; retryable (the restarted pod resumes from the newest checkpoint)."""
EXIT_STORAGE_UNAVAILABLE = 75
"""Storage could not be reached (EX_TEMPFAIL); retryable."""
EXIT_INTERRUPTED = INTERRUPTED
"""Stopped by SIGTERM/SIGINT (preemption, eviction, suspend, Ctrl-C) on any rank: every rank stopped
after the same step and a complete checkpoint of it was saved (or training had not begun); retryable."""
EXIT_PEER_LOST = PEER_LOST
"""A collective failed: another rank's process is gone, or did not arrive within the process-group
timeout. The cause is on another pod; retryable from the newest complete checkpoint."""
EXIT_CONFIG = CONFIG_ERROR_EXIT_CODE
"""The job cannot succeed as written (78, EX_CONFIG); the operator's podFailurePolicy fails the Job at once."""


class TrainerError(Exception):
    """An error with a one-line message for users and the exit code it ends the run with."""

    exit_code = EXIT_FAILED
    reason = "TrainingFailed"


class ConfigError(TrainerError):
    """The spec, the data or the credentials are wrong: retrying cannot help."""

    exit_code = EXIT_CONFIG
    reason = "InvalidConfiguration"


class StorageUnavailable(TrainerError):
    """The storage endpoint could not be reached; a later attempt may succeed."""

    exit_code = EXIT_STORAGE_UNAVAILABLE
    reason = "StorageUnavailable"


class Interrupted(TrainerError):
    """A stop signal arrived; the trainer checkpointed and stopped. A restart resumes."""

    exit_code = EXIT_INTERRUPTED
    reason = "Interrupted"


class PeerLost(TrainerError):
    """A collective failed because another rank went away or kept this one waiting too long."""

    exit_code = EXIT_PEER_LOST
    reason = "PeerLost"
