"""The scheme table: every scheme the API accepts has an entry, `open_store` and `stage` both read it,
and a scheme that cannot do one of them says so as a ConfigError naming the URI."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.spec import StorageSpec
from kubetune.api.uris import CLUSTER_SCHEMES, LOCAL_EXTRA
from kubetune_trainer.exitcodes import ConfigError
from kubetune_trainer.storage.local import LocalStore
from kubetune_trainer.storage.s3 import S3Store
from kubetune_trainer.storage.schemes import SCHEMES, Scheme, open_store, stage
from kubetune_trainer.storage.staging import StagingReport


def test_every_scheme_the_api_accepts_has_an_entry() -> None:
    accepted = {scheme for schemes in CLUSTER_SCHEMES.values() for scheme in schemes} | set(LOCAL_EXTRA)
    assert accepted <= set(SCHEMES)


@pytest.mark.parametrize("role", ["data", "output"])
def test_every_data_and_output_scheme_opens_a_store(role: str) -> None:
    for scheme in (*CLUSTER_SCHEMES[role], *LOCAL_EXTRA):
        assert SCHEMES[scheme].store is not None, scheme


@pytest.mark.parametrize(("uri", "kind"), [
    ("s3://bucket/prefix", S3Store),
    ("pvc://claim/prefix", LocalStore),
    ("file:///tmp/prefix", LocalStore),
    ("/tmp/prefix", LocalStore),
])
def test_open_store_gives_the_backend_of_the_scheme(uri: str, kind: type) -> None:
    assert isinstance(open_store(uri, StorageSpec(endpoint="http://127.0.0.1:9")), kind)


def test_a_pvc_store_resolves_under_the_mount_root(tmp_path: Path) -> None:
    store = open_store("pvc://claim/x", StorageSpec(), pvc_root=tmp_path)
    assert store.path_of("pvc://claim/x/a.txt") == tmp_path / "claim" / "x" / "a.txt"


@pytest.mark.parametrize("uri", ["hf://org/model", "gs://bucket/key"])
def test_a_scheme_without_a_store_cannot_be_opened(uri: str) -> None:
    with pytest.raises(ConfigError, match=rf"{uri}: scheme \w+:// cannot be read or written here"):
        open_store(uri, StorageSpec())


def test_an_unknown_scheme_cannot_be_staged(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gs://bucket/key: scheme gs:// cannot be staged"):
        stage("gs://bucket/key", tmp_path, StorageSpec())


def test_a_new_scheme_is_one_entry_that_both_doors_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    monkeypatch.setitem(SCHEMES, "mem", Scheme(store=lambda spec, pvc_root: store,
                                               stage=lambda uri, dest, spec, pvc_root, variant: StagingReport(dest)))
    assert open_store("mem://bucket/key", StorageSpec()) is store
    assert stage("mem://bucket/key", tmp_path / "dest", StorageSpec()).path == tmp_path / "dest"
