"""Samples and validation losses do not depend on adapter dropout's draw.

Trained modules run in training mode (dropout applies, transformers checkpoints only there);
`Components.evaluating` puts every module in eval mode while images are made or the held-out
loss is measured, and restores the modes after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer_probe import running_trainers
from trainer_support import local_job

from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.job import run_job


def test_validation_and_samples_run_in_eval_mode_with_adapter_dropout(tiny_sd: Path, squares: Path,
                                                                      tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def probe(record: Any) -> None:
        trainer = built[-1]
        components, validator = trainer.p.components, trainer.p.validator
        seen["training"] = components.denoiser.training
        seen["losses"] = [validator.evaluate(trainer.p.denoiser) for _ in range(2)]
        seen["after"] = components.denoiser.training
        with components.evaluating():
            seen["inside"] = [m.training for m in components.modules().values()]

    job = local_job(str(tiny_sd), str(squares), str(tmp_path / "out"), training={"maxSteps": 1},
                    method={"type": "lora", "lora": {"rank": 4, "dropout": 0.5}},
                    data={"validationFraction": 0.25})
    with running_trainers() as built:
        result = run_job(job, RuntimeConfig(scratch=tmp_path / "s", log_every=0), hooks=[probe])
    assert result.exit_code == 0, result.message
    assert seen["training"] is True and seen["after"] is True
    assert not any(seen["inside"])
    first, second = seen["losses"]
    assert first == second  # with dropout 0.5 in training mode the two evaluations would differ
