"""Condition reasons and messages, defined once as pairs, and the standard condition rules.

Every phase the operator reports comes with one of these reasons, so users, events and
tests see the same words. `lastTransitionTime` moves only when a condition's status flips.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api.status import CONDITION_TYPES, Condition


@dataclass(frozen=True)
class Reason:
    """A condition reason with its message template (`str.format` fields)."""

    reason: str
    message: str
    warning: bool = False

    def say(self, **fields: object) -> tuple[str, str]:
        return self.reason, self.message.format(**fields)


INVALID_SPEC = Reason("InvalidSpec", "the spec is invalid: {problems}", warning=True)
SECRET_NOT_FOUND = Reason(
    "SecretNotFound",
    "Secret {secret} (spec.storage.secretRef.name) was not found in namespace {namespace}: create it "
    "with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    warning=True,
)
SECRET_INCOMPLETE = Reason(
    "SecretIncomplete",
    "Secret {secret} (spec.storage.secretRef.name) lacks key(s) {keys}",
    warning=True,
)
CREATING = Reason("Creating", "creating the ConfigMap, Service and Job")
CREATED = Reason("ChildrenCreated", "created Job {job} with {nodes} pod(s)")
PODS_PENDING = Reason("PodsPending", "waiting for {waiting} of {nodes} pod(s) to start")
UNSCHEDULABLE = Reason("Unschedulable", "pod {pod} cannot be scheduled: {detail}", warning=True)
CONTAINER_WAITING = Reason("ContainerWaiting", "pod {pod} cannot start: {detail}", warning=True)
STAGING = Reason("Staging", "pods are running; staging the model and data")
TRAINING = Reason("Training", "training on {nodes} pod(s)")
SUSPENDED = Reason("Suspended", "suspended by spec.runPolicy.suspend; set it to false to resume")
QUEUED = Reason("Queued", "waiting for admission by Kueue LocalQueue {queue}")
ADMITTED = Reason("Admitted", "admitted by Kueue LocalQueue {queue}")
RESTARTING = Reason(
    "Restarting",
    "attempt failed ({cause}); restarting from the newest checkpoint (restart {restarts} of {limit})",
    warning=True,
)
NODE_DISRUPTED = Reason(
    "NodeDisrupted",
    "a node was lost or drained ({cause}); restarting from the newest checkpoint, not counted as a retry",
    warning=True,
)
SUCCEEDED = Reason("Succeeded", "training finished; outputs at {uri}")
EARLY_STOPPED = Reason("EarlyStopped", "training stopped early ({detail}); outputs at {uri}")
BACKOFF_LIMIT_EXCEEDED = Reason(
    "BackoffLimitExceeded",
    "failed after {restarts} restart(s) (spec.runPolicy.backoffLimit is {limit}): {cause}",
    warning=True,
)
CONFIG_ERROR = Reason(
    "ConfigError", "the trainer rejected the job's configuration; not retried: {detail}", warning=True
)
DEADLINE_EXCEEDED = Reason(
    "DeadlineExceeded",
    "ran longer than spec.runPolicy.activeDeadlineSeconds ({seconds}s)",
    warning=True,
)
OUTPUT_CONFLICT = Reason(
    "OutputConflict",
    "spec.output.uri {uri} overlaps {other_uri}, the output of FineTuneJob {other} ({other_phase}): two jobs "
    "writing one prefix would resume from, prune and overwrite each other's checkpoints; choose another "
    "spec.output.uri, or delete {other} first and re-create this job",
    warning=True,
)
DATA_SKIPPED = Reason(
    "ImagesSkipped",
    "{skipped} of {total} image(s) skipped (spec.data.maxSkipped is {limit}): {files}",
    warning=True,
)
NO_DATA_SKIPPED = Reason("NoImagesSkipped", "all {images} image(s) are used")
NOT_STARTED = Reason("NotStarted", "")
NOT_FINISHED = Reason("NotFinished", "")

PHASE_CONDITION = {
    "Pending": "Running",
    "Staging": "Running",
    "Running": "Running",
    "Restarting": "Restarting",
    "Suspended": "Suspended",
    "Succeeded": "Succeeded",
    "Failed": "Failed",
}
"""The condition that explains each phase: True in it, except Pending (Running False, saying why)."""


def find(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def updated(
    previous: Condition | None, type_: str, status: str, reason: str, message: str, now: str, generation: int | None
) -> Condition:
    """A condition with `lastTransitionTime` kept unless its status flips."""
    flipped = previous is None or previous.status != status
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now if flipped else previous.last_transition_time,
        observed_generation=generation,
    )


def phase_conditions(
    previous: list[Condition],
    phase: str,
    reason: str,
    message: str,
    created: tuple[bool, str, str],
    now: str,
    generation: int | None,
) -> list[Condition]:
    """All standard conditions for a phase: the phase's own is True with `reason`, others False.

    `created` is (status, reason, message) of the Created condition, which is independent of
    the phase: a job can fail after its children exist, or before (invalid spec).
    """
    true_type = PHASE_CONDITION.get(phase)
    out = []
    for type_ in CONDITION_TYPES:
        old = find(previous, type_)
        if type_ == "Created":
            status, why, text = "True" if created[0] else "False", created[1], created[2]
        elif type_ == true_type:
            status, why, text = "False" if phase == "Pending" else "True", reason, message
        else:
            status, (why, text) = "False", _when_false(old, type_, reason, message)
        out.append(updated(old, type_, status, why, text, now, generation))
    return out


def _when_false(old: Condition | None, type_: str, reason: str, message: str) -> tuple[str, str]:
    """A False condition keeps its words; one that just stopped being True says why."""
    if old is not None and old.status == "False":
        return old.reason, old.message
    if old is not None:
        return reason, message
    return (NOT_FINISHED if type_ in ("Succeeded", "Failed") else NOT_STARTED).reason, ""
