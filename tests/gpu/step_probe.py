"""`step_probe.py OUT ARGS...`: run `kubetune ARGS...` and record the process group its optimizer steps in.

Started by torchrun in tests/gpu/test_cuda_path.py. A global optimizer-step hook (the instrument
bench/trainer_throughput.py's clock uses) writes to OUT, after every step, how many steps ran and,
from the first step, the torch.distributed backend and world size and the device of the weights
being stepped: what the trainer really trained with, read from torch rather than from its logs.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any


def main() -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    out, *args = sys.argv[1:]
    seen: dict[str, Any] = {"steps": 0}

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        dist = torch.distributed
        if seen["steps"] == 0:
            seen["backend"] = dist.get_backend() if dist.is_initialized() else None
            seen["world_size"] = dist.get_world_size() if dist.is_initialized() else None
            seen["device"] = next(p.device.type for group in optimizer.param_groups for p in group["params"])
        seen["steps"] += 1
        Path(out).write_text(json.dumps(seen), encoding="utf-8")

    register_optimizer_step_post_hook(after_step)
    sys.argv = ["kubetune", *args]
    runpy.run_module("kubetune.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
