"""Subcommands of the `kubetune` CLI, in the order `--help` lists them."""

from __future__ import annotations

from kubetune.commands import crd, demo, operator, run, train, validate

COMMANDS = (validate, crd, run, train, demo, operator)
