"""Tests that need a Debian tool (promtool, prometheus): `make tools` installs it.

On a developer's machine without it, such a test is skipped with the command that fixes that.
Under CI (`CI` set; `make test` installs the tools first) it is never skipped: a missing tool
fails the run instead of hiding the feature it checks.
"""

from __future__ import annotations

import os
import shutil

import pytest


def needs_tools(*names: str) -> pytest.MarkDecorator:
    missing = [name for name in names if shutil.which(name) is None]
    return pytest.mark.skipif(bool(missing) and not os.environ.get("CI"),
                              reason=f"{', '.join(missing)} not installed: `make tools` installs it (CI never skips)")
