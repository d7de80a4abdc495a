"""Subcommands of the `kubetune` CLI, in the order `--help` lists them."""

from __future__ import annotations

from kubetune.commands import crd, operator, validate

COMMANDS = (validate, crd, operator)
