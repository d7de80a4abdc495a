"""Training options that must do what they say: the 8-bit and Prodigy optimizers train, the
learning rate follows the set cycles and power, and gradient checkpointing covers trained text encoders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_support import local_job

from kubetune.api.spec import TrainingSpec
from kubetune_trainer.assembly import build_trainer
from kubetune_trainer.config import RuntimeConfig
from kubetune_trainer.optim import build_lr_scheduler
from kubetune_trainer.reporting import Reporter


def _trainer(model: Path, data: Path, tmp_path: Path, **spec: Any) -> Any:
    job = local_job(str(model), str(data), str(tmp_path / "out"), **spec)
    return build_trainer(job, RuntimeConfig(scratch=tmp_path / "scratch", log_every=0), Reporter())


def _trained_copy(trainer: Any) -> list[Any]:
    return [p.detach().clone() for p in trainer.trainable_parameters()]


@pytest.mark.parametrize(("optimizer", "method", "cls", "state_key"), [
    ("adamw8bit", {"type": "full", "lora": None}, "AdamW8bit", "state1"),  # big enough tensors for 8-bit moments
    ("prodigy", {"type": "lora"}, "Prodigy", "exp_avg"),
])
def test_optimizer_trains(optimizer: str, method: dict[str, Any], cls: str, state_key: str, tiny_sd: Path,
                          squares: Path, tmp_path: Path) -> None:
    import torch

    trainer = _trainer(tiny_sd, squares, tmp_path, method=method,
                       training={"optimizer": optimizer, "learningRate": 1.0e-3})
    before = _trained_copy(trainer)
    for _ in range(2):
        loss, _ = trainer.train_step()
        assert torch.isfinite(torch.tensor(loss))
    inner = trainer.p.optimizer.optimizer
    assert type(inner).__name__ == cls
    states = [inner.state[p] for p in trainer.trainable_parameters()]
    assert all(state_key in state for state in states)
    if optimizer == "adamw8bit":  # bitsandbytes keeps tensors under 4096 elements at 32 bits
        assert {state["state1"].dtype for state in states if state["state1"].numel() >= 4096} == {torch.uint8}
    after = trainer.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _learning_rates(schedule: dict[str, Any], steps: int) -> list[float]:
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, TrainingSpec(learning_rate=1.0, lr_scheduler=schedule), steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_with_restarts_restarts_num_cycles_times() -> None:
    rates = _learning_rates({"type": "cosine_with_restarts", "numCycles": 3}, 12)
    restarts = [step for step in range(1, 12) if rates[step] > rates[step - 1]]
    assert restarts == [4, 8]
    assert rates[0] == rates[4] == rates[8] == 1.0
    assert rates[2] == pytest.approx(0.5)  # half-way down the first of three cycles


def test_polynomial_decays_with_the_set_power() -> None:
    lr_end = 1e-7  # diffusers' floor
    for power in (1.0, 2.0, 0.5):
        rates = _learning_rates({"type": "polynomial", "power": power}, 10)
        assert rates[5] == pytest.approx((1.0 - lr_end) * 0.5**power + lr_end)


@pytest.mark.parametrize(("checkpointing", "forwards"), [(False, 1), (True, 2)])
def test_gradient_checkpointing_recomputes_trained_text_encoders(checkpointing: bool, forwards: int, tiny_sd: Path,
                                                                squares: Path, tmp_path: Path) -> None:
    """A checkpointed layer runs its forward again in the backward pass; the encoder's adapters still learn."""
    import torch

    trainer = _trainer(tiny_sd, squares, tmp_path, method={"lora": {"rank": 4, "alpha": 8, "trainTextEncoder": True}},
                       training={"gradientCheckpointing": checkpointing, "maxSteps": 1, "batchSize": 1})
    encoder = trainer.p.components.text_encoders[0]
    calls: list[int] = []
    layer = next(m for m in encoder.modules() if type(m).__name__ == "CLIPEncoderLayer")
    layer.mlp.register_forward_pre_hook(lambda *args: calls.append(1))  # inside the layer's checkpointed forward
    adapters = [p for n, p in encoder.named_parameters() if "lora_" in n]
    before = [p.detach().clone() for p in adapters]
    trainer.train_step()
    assert len(calls) == forwards
    assert any(not torch.equal(a, b) for a, b in zip(before, adapters, strict=True))
