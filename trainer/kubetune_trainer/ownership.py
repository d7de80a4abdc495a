"""Which job an output prefix belongs to, checked before a run stages, downloads or writes anything.

Two jobs given the same `output.uri` would otherwise resume from, prune and overwrite each
other's checkpoints and final weights. A job's identity is `JobIdentity.of(job)`: namespace/name
plus a digest of the weight-shaping fields. The prefix records its owner twice:

- `kubetune-owner.json` at its root, written by the owner's first write (before its first
  training step), so that a prefix holding only final weights, samples or caches is claimed too;
- `owner` in every checkpoint manifest (see `checkpoint`).

Before staging, and before preflight's write probe, every rank reads both. Another identity
there is a `ConfigError` (exit 78) that names it and the way out, and nothing is written. So is
an owner record that cannot be read (not UTF-8, not JSON, nested past the parser): it proves no
other owner, but overwriting it could take another job's prefix, so a person decides. A prefix
whose contents record no owner at all (written before owners were recorded) is adopted by the
first job that runs there, with a notice. The record is created only where none exists (a
conditional put on S3, a hard link on local stores) and read back, so of two jobs started at the
same moment exactly one proceeds; each checkpoint and the export confirm it again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune.api.identity import WEIGHT_FIELDS, JobIdentity
from kubetune.api.resource import FineTuneJob
from kubetune.api.spec import FineTuneJobSpec
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.preflight import PROBE_PREFIX
from kubetune_trainer.storage.interface import ObjectStore, as_prefix, create_text, read_text
from kubetune_trainer.storage.schemes import open_store

OWNER_RECORD = "kubetune-owner.json"
_MANIFEST = "manifest.json"
_CHECKPOINTS = "checkpoints/"


def weight_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The values the identity's digest covers, kept in the owner record so a refusal can say which differ."""
    doc = spec.model_dump(mode="json", by_alias=True)
    picked: dict[str, Any] = {}
    for path in WEIGHT_FIELDS:
        value: Any = doc
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        picked[path] = value
    return picked


@dataclass(frozen=True)
class OwnerRecord:
    """The content of `kubetune-owner.json`."""

    owner: JobIdentity
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> OwnerRecord | None:
        """The record in `text`, or None when it is not one."""
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser
            return None
        owner = JobIdentity.from_dict(raw.get("owner")) if isinstance(raw, dict) else None
        if owner is None:
            return None
        fields = raw.get("weightFields")
        return cls(owner, fields if isinstance(fields, dict) else {})

    def text(self) -> str:
        claimed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps({"owner": self.owner.as_dict(), "claimedAt": claimed, "weightFields": self.fields},
                          indent=2, sort_keys=True) + "\n"


@dataclass
class Survey:
    """What an output prefix holds, as far as ownership goes."""

    record: OwnerRecord | None = None
    record_problem: str | None = None
    manifest_owners: dict[int, JobIdentity | None] = field(default_factory=dict)
    """The owner each readable checkpoint manifest records (None: written before owners were recorded)."""
    objects: int = 0

    def foreign(self, ours: JobIdentity) -> JobIdentity | None:
        """Another identity the prefix records, the owner record's first; None when there is none."""
        if self.record is not None and self.record.owner != ours:
            return self.record.owner
        return next((owner for _, owner in sorted(self.manifest_owners.items(), reverse=True)
                     if owner is not None and owner != ours), None)

    def unowned(self) -> str | None:
        """What the prefix holds without any recorded owner, in words; None when nothing or owned."""
        if self.record is not None or not self.objects or any(self.manifest_owners.values()):
            return None
        steps = sorted(self.manifest_owners)
        if steps:
            return f"checkpoints (steps {', '.join(map(str, steps))}) written before kubetune recorded their owner"
        return f"{self.objects} objects that record no owner"


def _step_of(relative: str) -> int | None:
    """The step of `checkpoints/step-N/manifest.json`, else None."""
    parts = relative.split("/")
    if len(parts) != 3 or parts[0] + "/" != _CHECKPOINTS or parts[2] != _MANIFEST:
        return None
    number = parts[1].removeprefix("step-")
    return int(number) if parts[1].startswith("step-") and number.isdigit() else None


def _read_text(store: ObjectStore, uri: str, scratch: Path) -> str | None:
    """A small object's text; None when it is gone; "" when its bytes are not UTF-8 (so it parses as nothing)."""
    try:
        return read_text(store, uri, scratch)
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return ""


def survey_output(store: ObjectStore, uri: str, scratch: Path) -> Survey:
    """Read the owner record and every checkpoint manifest's owner under `uri`; writes nothing."""
    survey = Survey()
    for obj in store.list(as_prefix(uri)):
        if obj.relative.startswith(PROBE_PREFIX):  # another rank's preflight probe, removed in a moment
            continue
        survey.objects += 1
        step = _step_of(obj.relative)
        if obj.relative != OWNER_RECORD and step is None:
            continue
        text = _read_text(store, obj.uri, scratch)
        if text is None:
            continue  # deleted since the listing: a prune by the job that writes here
        if step is None:
            survey.record = OwnerRecord.parse(text)
            survey.record_problem = None if survey.record else f"{obj.uri} is not a kubetune owner record"
            continue
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError):
            continue  # an unreadable manifest names no owner; the checkpointer skips it as damaged
        survey.manifest_owners[step] = JobIdentity.from_dict(raw.get("owner")) if isinstance(raw, dict) else None
    return survey


def _differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    return [f"{path} {json.dumps(theirs[path])} there, {json.dumps(ours.get(path))} here"
            for path in WEIGHT_FIELDS if path in theirs and theirs[path] != ours.get(path)]


def refusal(uri: str, theirs: JobIdentity, ours: JobIdentity, their_fields: dict[str, Any],
            our_fields: dict[str, Any]) -> ConfigError:
    """The one-line error for an output prefix that belongs to another job: who owns it, and the way out."""
    where = as_prefix(uri)
    if theirs.same_job(ours):
        diff = _differences(their_fields, our_fields)[:3] or [f"spec {theirs.spec_digest} there, "
                                                               f"{ours.spec_digest} here"]
        who = (f"{where} holds the output of {theirs.namespace}/{theirs.name} trained with different "
               f"weight-shaping fields ({'; '.join(diff)})")
    else:
        who = (f"{where} holds the output of job {theirs.namespace}/{theirs.name} (spec {theirs.spec_digest}), "
               f"not of {ours.namespace}/{ours.name}")
    return ConfigError(f"{who}; nothing was changed there. Give this job a new spec.output.uri, or delete "
                       f"everything under {where} (its checkpoints and final weights) to start over there")


class OutputClaim:
    """This job's claim on its output prefix: checked before staging, recorded on the first write."""

    def __init__(self, store: ObjectStore, uri: str, identity: JobIdentity, fields: dict[str, Any],
                 scratch: Path) -> None:
        self.store, self.uri, self.scratch = store, as_prefix(uri), scratch
        self.identity, self.fields = identity, fields

    @property
    def record_uri(self) -> str:
        return self.uri + OWNER_RECORD

    def check(self, survey: Survey) -> str | None:
        """Raise `ConfigError` if the prefix belongs to another identity; return a notice when adopting."""
        if survey.record_problem:
            raise self.unreadable()
        theirs = survey.foreign(self.identity)
        if theirs is not None:
            fields = survey.record.fields if survey.record and survey.record.owner == theirs else {}
            raise refusal(self.uri, theirs, self.identity, fields, self.fields)
        unowned = survey.unowned()
        if unowned is None:
            return None
        return (f"{self.uri} holds {unowned}; {self.identity.namespace}/{self.identity.name} adopts them (resumes "
                "from them, replaces final outputs). If they belong to another job, stop this one and give it a "
                "new spec.output.uri")

    def refuse(self, theirs: JobIdentity) -> ConfigError:
        return refusal(self.uri, theirs, self.identity, {}, self.fields)

    def unreadable(self) -> ConfigError:
        """An owner record that cannot be read is no proof of another owner, nor safe to overwrite: a human looks."""
        return ConfigError(f"{self.record_uri} is not a kubetune owner record (not UTF-8 JSON naming an owner), so "
                           f"whose output {self.uri} holds is unknown; nothing was changed there. Give this job a new "
                           f"spec.output.uri, or delete {self.record_uri} if {self.uri} is this job's output")

    def _record(self) -> OwnerRecord | None:
        """The owner record, None when absent; `ConfigError` when it is there but not a record."""
        text = _read_text(self.store, self.record_uri, self.scratch)
        record = OwnerRecord.parse(text) if text is not None else None
        if text is not None and record is None:
            raise self.unreadable()
        return record

    def confirm(self) -> None:
        """Before writing: the owner record names this job (created now if absent); `ConfigError` if not.

        Called on the first write of a run and before every checkpoint and export. The record is
        created only where none exists (`If-None-Match: *` on S3, a hard link on local stores) and read
        back, so of two jobs that start together on one prefix exactly one proceeds; the other stops
        here, before its first lasting write.
        """
        record = self._record()
        if record is None:
            create_text(self.store, self.record_uri, OwnerRecord(self.identity, self.fields).text(), self.scratch)
            record = self._record()  # whoever created it, even if this store could only overwrite
            if record is None:
                raise ConfigError(f"{self.record_uri} was written but cannot be read back; check that {self.uri} "
                                  "keeps what is written to it (a bucket lifecycle rule, another process)")
        if record.owner != self.identity:
            raise refusal(self.uri, record.owner, self.identity, record.fields, self.fields)


def claim_output(job: FineTuneJob, runtime: RuntimeConfig, notify: Callable[[str], None]) -> OutputClaim:
    """Check, before anything is staged or written, that `spec.output.uri` is this job's to use.

    Every rank checks (so all of them stop alike); none writes here, not even preflight's probe,
    which runs after this: the record is created by `OutputClaim.confirm` on the run's first write.
    """
    spec = job.spec
    store = open_store(spec.output.uri, spec.storage, runtime.pvc_root)
    claim = OutputClaim(store, spec.output.uri, JobIdentity.of(job), weight_fields(spec), runtime.scratch / "tmp")
    try:
        survey = survey_output(store, spec.output.uri, claim.scratch)
    except ConfigError as exc:  # a missing bucket or refused credentials, found here before preflight's probe
        raise ConfigError(f"output.uri {spec.output.uri}: {exc}") from exc
    notice = claim.check(survey)
    if notice:
        notify(notice)  # e.g. an adopted prefix written before owners were recorded
    return claim
