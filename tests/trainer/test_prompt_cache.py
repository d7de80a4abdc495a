"""Caption encodings are computed once while the text encoders are frozen, equal to encoding
afresh, and computed every time once a text-encoder weight trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.spec import LoraSpec
from kubetune_trainer.methods import LoraMethod
from kubetune_trainer.models import Components, load_components

CAPTIONS = ["a red square", "a blue square", "a red square"]


def _counting(components: Components) -> list[int]:
    """Rows each text encoder forward has seen, appended per call."""
    seen: list[int] = []
    for encoder in components.text_encoders:
        encoder.register_forward_hook(lambda module, args, output: seen.append(int(args[0].shape[0])))
    return seen


def _encode(components: Components, captions: list[str]) -> tuple:
    cond = components.family.encode(components, captions, [(64, 64, 0, 0, 64, 64)] * len(captions), "cpu")
    return cond.encoder_hidden_states, cond.added_cond_kwargs


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sdxl"])
def test_frozen_text_encoders_encode_each_caption_once(model: str, request: pytest.FixtureRequest) -> None:
    import torch

    components = load_components(request.getfixturevalue(model), None)
    fresh = load_components(request.getfixturevalue(model), None)
    fresh.prompts.limit_bytes = 0  # caches nothing: every call encodes
    seen = _counting(components)
    with torch.no_grad():
        first, first_added = _encode(components, CAPTIONS)
        second, _ = _encode(components, list(reversed(CAPTIONS)))
        want, want_added = _encode(fresh, CAPTIONS)
    assert seen == [2] * len(components.text_encoders)  # two distinct captions, one call per encoder
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(second, want.flip(0))
    if want_added is not None:
        torch.testing.assert_close(first_added["text_embeds"], want_added["text_embeds"])
    assert (components.prompts.hits, components.prompts.misses) == (4, 2)


def test_a_training_text_encoder_is_encoded_every_time(tiny_sd: Path) -> None:
    components = load_components(tiny_sd, None)
    LoraMethod(LoraSpec(rank=2, alpha=2, train_text_encoder=True)).prepare(components)
    seen = _counting(components)
    _encode(components, CAPTIONS)
    _encode(components, CAPTIONS)
    assert seen == [3, 3]
    assert components.prompts.rows == {}
