"""What the ranks of a multi-process run agree on, and how a lost peer shows up in one of them.

A stop signal reaches one pod at a time (the kubelet signals a pod's launcher, which forwards
it to that pod's workers), yet every rank must stop after the same step: otherwise one rank
waits in the checkpoint barrier while another waits in the gradient all-reduce. So at the end
of every step the ranks all-reduce (MAX) one number, the signal this rank received or 0, and
all of them stop after that step when it is not 0.

When a peer's process dies, its connections close and the next collective fails at once (gloo
raises; for NCCL the launcher sets TORCH_NCCL_ASYNC_ERROR_HANDLING=2, so the communicator is
aborted and the error raised in the main thread rather than the process torn down); when a
peer stalls, the collective fails after the process-group timeout. `collective_failure` turns
either into `PeerLost` (exit 76), which says the cause lies on another pod.
"""

from __future__ import annotations

import signal
from typing import Any

from kubetune_trainer.exitcodes import PeerLost

PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
             "remote process exited", "network error", "communicator was aborted")
TIMED_OUT = ("timed out", "timeout")


def agreed_signal(received: str | None, accelerator: Any) -> str | None:
    """The stop signal any rank received (the highest number wins), or None. A collective: every rank calls it."""
    if accelerator.num_processes == 1:
        return received
    import torch
    import torch.distributed as dist

    flag = torch.tensor([signal.Signals[received].value if received else 0], dtype=torch.int64,
                        device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    number = int(flag.item())
    return signal.Signals(number).name if number else None


def _in_a_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_failure(exc: BaseException, timeout_seconds: int) -> PeerLost | None:
    """`PeerLost` when `exc` is a failed collective of a multi-process group; None for anything else."""
    if isinstance(exc, OSError) or not _in_a_group():
        return None
    import torch.distributed as dist

    text = str(exc).lower()
    if not (isinstance(exc, dist.DistError) or "gloo" in text or "nccl" in text):
        return None
    detail = str(exc).splitlines()[0].split(" This is typically")[0][:300]
    gone = any(words in text for words in PEER_GONE) or isinstance(exc, dist.DistNetworkError)
    if any(words in text for words in TIMED_OUT) and not gone:
        return PeerLost(f"another rank did not join a collective within runPolicy.processGroupTimeoutSeconds "
                        f"({timeout_seconds} s): it is stuck, far slower than this one, or unreachable ({detail})")
    if gone:
        return PeerLost(f"another rank went away during a collective (its pod was lost or its process ended; "
                        f"see that pod's log): {detail}")
    return None
