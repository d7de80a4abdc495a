"""The Kubernetes Events a status transition deserves, as a pure function of old and new.

Events are emitted after the status write and only on change, so a job that stays
Pending for an hour produces one event, not one per pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubetune.api.status import FineTuneJobStatus
from kubetune.operator import conditions as cond

WARNING_REASONS = frozenset(
    r.reason for r in vars(cond).values() if isinstance(r, cond.Reason) and r.warning
)
CHECKPOINT_SAVED = cond.Reason("CheckpointSaved", "checkpoint at step {step}: {uri}")


@dataclass(frozen=True)
class Event:
    """One core/v1 Event about the FineTuneJob."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def primary_reason(status: FineTuneJobStatus) -> str | None:
    """The reason behind the phase, from the condition that explains it."""
    type_ = cond.PHASE_CONDITION.get(status.phase or "", "Created")
    found = cond.find(status.conditions, type_)
    return found.reason if found is not None else None


def _event(reason: str, message: str) -> Event:
    return Event("Warning" if reason in WARNING_REASONS else "Normal", reason, message)


def events_for_transition(old: FineTuneJobStatus | None, new: FineTuneJobStatus) -> list[Event]:
    """Events for what changed between two statuses, oldest fact first."""
    old = old or FineTuneJobStatus()
    out: list[Event] = []
    was_created, created = cond.find(old.conditions, "Created"), cond.find(new.conditions, "Created")
    if created and created.status == "True" and not (was_created and was_created.status == "True"):
        out.append(_event(created.reason, created.message))
    reason = primary_reason(new)
    if reason and (old.phase, primary_reason(old), old.restarts) != (new.phase, reason, new.restarts):
        out.append(_event(reason, new.message))
    was_skipping, skipping = cond.find(old.conditions, "DataSkipped"), cond.find(new.conditions, "DataSkipped")
    if skipping and skipping.status == "True" and not (was_skipping and was_skipping.status == "True"):
        out.append(_event(skipping.reason, skipping.message))
    known = {c.step for c in old.checkpoints}
    fresh = [c for c in new.checkpoints if c.step not in known]
    if fresh:
        out.append(_event(*CHECKPOINT_SAVED.say(step=fresh[-1].step, uri=fresh[-1].uri)))
    return out
