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
