"""Which namespaces `kubetune operator` watches: its own unless told otherwise, because the chart
grants write rights per namespace and a cluster-wide watch would only meet 403s."""

from __future__ import annotations

import pytest

from kubetune.cli import build_parser
from kubetune.commands.operator import watched_namespaces


@pytest.mark.parametrize(
    ("argv", "watched"),
    [
        ([], ["kubetune-system"]),
        (["-n", "team-a", "-n", "team-b"], ["team-a", "team-b"]),
        (["--all-namespaces"], None),
    ],
    ids=["default-own-namespace", "listed", "all"],
)
def test_operator_watches_its_own_namespace_unless_told(argv: list[str], watched: list[str] | None) -> None:
    args = build_parser().parse_args(["operator", *argv])
    assert watched_namespaces(args, own_namespace="kubetune-system") == watched


def test_namespace_and_all_namespaces_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "-n", "a", "-A"])
    assert "not allowed with argument" in capsys.readouterr().err
