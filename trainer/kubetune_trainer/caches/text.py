"""Caption encodings kept on the scratch volume while every text encoder is frozen.

A frozen text encoder turns the same caption into the same tensors at every step, so each
distinct caption is encoded once per job: the outputs the model family asks for (SD: the last
hidden state; SDXL: both encoders' penultimate hidden states, joined, and the pooled
embedding) are stored as one entry per caption, named by a digest of its exact text. Entries
live in one folder per model family, text encoders (config, dtype and weights) and tokenizers
(files and max length) (`text_cache_folder`), so another model never reads them, and
`caches.mirror` carries them to a new pod through `<output>/cache/text/<key>/`. The cache is
`Components.text_cache`, bypassed as soon as a text-encoder weight trains.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kubetune_trainer.caches.entries import DiskEntries
from kubetune_trainer.models.family import Components, TextEncode

_LOAD_DETAILS = {"transformers_version", "torch_dtype", "dtype"}
"""Config keys that say how a model was loaded, not what it computes (its dtype is in the weights)."""


def _update_with_module(digest: Any, module: Any) -> None:
    """The module's config and every weight, hashed as stored (its dtype included) without a copy on CPU."""
    import torch

    config = {k: v for k, v in module.config.to_dict().items() if k not in _LOAD_DETAILS and not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().data)


def _update_with_tokenizer(digest: Any, tokenizer: Any, folder: Path) -> None:
    digest.update(f"{type(tokenizer).__name__}|{tokenizer.model_max_length}|{len(tokenizer)}".encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []:
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())


def text_cache_folder(root: Path, components: Components) -> Path:
    """`root/<key>`, the key a digest of the family, its text settings, each text encoder and each tokenizer.

    Hashing the encoders' weights reads them once (SDXL's two: about 1.6 GB in bf16, 1.6 s at
    1 GB/s); it is what keeps a fine-tuned text encoder with the same config from reusing the
    base model's encodings.
    """
    digest = hashlib.sha256(components.family.name.encode())
    absent = sorted(components.extra.get("absent", ()))
    settings = {**components.family.sampling_arguments(components), "absent": absent}
    if any(settings.values()):  # T5's sequence length, an encoder left out
        digest.update(json.dumps(settings, sort_keys=True).encode())
    pairs = zip(components.tokenizers, components.text_encoders, components.family.tokenizer_names, strict=False)
    for tokenizer, encoder, folder in pairs:
        _update_with_tokenizer(digest, tokenizer, Path(components.path) / folder)
        _update_with_module(digest, encoder)
    return Path(root) / digest.hexdigest()[:16]


class DiskTextCache(DiskEntries):
    """One file per distinct caption under `folder`, held on `device` once read; misses are encoded together.

    It is the components' `text_cache` (`models.family.TextCache`), used while no text-encoder weight trains.
    """

    kind = "text"
    label = "text cache"

    def __init__(self, folder: Path, device: Any = None, keep_bytes: int = 1 << 30) -> None:
        super().__init__(folder, keep_bytes)
        self.device = device

    @staticmethod
    def entry_name(caption: str) -> str:
        return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]

    def placed(self, value: Any) -> Any:
        return tuple(part.to(self.device) for part in value) if self.device is not None else value

    def encodings(self, captions: list[str], encode: TextEncode) -> tuple[Any, ...]:
        """`encode(captions)` gives tensors with one row per caption; cached captions are not encoded again."""
        import torch

        def encoded(rows: list[int]) -> list[tuple[Any, ...]]:
            outputs = encode([captions[row] for row in rows])  # a clone, so an entry never holds the whole batch
            return [tuple(output[index].detach().clone() for output in outputs) for index in range(len(rows))]

        found = self.lookup([self.entry_name(caption) for caption in captions], encoded)
        return tuple(torch.stack([entry[part] for entry in found]) for part in range(len(found[0])))

    def shard_tensors(self, name: str) -> dict[str, Any]:
        """Part i of the entry under `<name>.<i>`."""
        return {f"{name}.{index}": part.detach().cpu().contiguous() for index, part in enumerate(self.load(name))}

    def from_shard(self, name: str, tensors: dict[str, Any]) -> bool:
        parts = []
        while f"{name}.{len(parts)}" in tensors:
            parts.append(tensors[f"{name}.{len(parts)}"])
        if not parts:
            return False
        self.store(name, tuple(parts))
        return True
