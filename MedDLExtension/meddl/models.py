"""Bundled model weights and their cards.

Each model is two files in ``Resources/models/``: ``NAME.pt`` (a state dict, nothing else)
and ``NAME.json``, its card::

    {"name": ..., "architecture": "module.path:ClassName", "arguments": {...},
     "training_data": ..., "command": "...", "metrics": {...}, "sha256": "..."}

Loading checks the sha256 before unpickling and unpickles with ``weights_only=True``, so a
file that would run code is refused. A user-given path overrides the bundled file. Nothing is
ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

__all__ = ["ModelCard", "models_dir", "find_model", "load_state_dict", "load_model", "save_model", "sha256_of"]

_REQUIRED = ("name", "architecture", "arguments", "training_data", "command", "metrics", "sha256")


def models_dir() -> Path:
    """Where bundled weights live: ``$MEDDL_MODELS_DIR``, else ``Resources/models`` of the source tree
    (or, in an installed Slicer extension, the folder installed beside the library)."""
    env = os.environ.get("MEDDL_MODELS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "Resources" / "models", here / "Resources" / "models", here.parent / "Resources" / "models"):
        if candidate.is_dir():
            return candidate
    return here.parent.parent / "Resources" / "models"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelCard:
    """The JSON card that describes one weights file."""

    name: str
    architecture: str
    arguments: dict[str, Any]
    training_data: Any
    command: str
    metrics: dict[str, Any]
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | os.PathLike) -> ModelCard:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"model card '{path}' is missing; every weights file needs a JSON card beside it") from None
        except json.JSONDecodeError as exc:
            raise ModelError(f"model card '{path}': not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(raw, dict):
            raise ModelError(f"model card '{path}': expected a JSON object, got {type(raw).__name__}")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ModelError(f"model card '{path}': missing field(s) {', '.join(missing)}")
        extra = {k: v for k, v in raw.items() if k not in _REQUIRED}
        return cls(**{k: raw[k] for k in _REQUIRED}, extra=extra)

    def write(self, path: str | os.PathLike) -> None:
        body = {k: getattr(self, k) for k in _REQUIRED} | self.extra
        Path(path).write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")


def find_model(name: str, path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Locate weights and card: ``path`` (a user's file) wins over the bundled ``NAME.pt``."""
    weights = Path(path) if path is not None else models_dir() / f"{name}.pt"
    card = weights.with_suffix(".json")
    if not weights.is_file():
        where = "given" if path is not None else f"bundled in {models_dir()}"
        raise ModelError(
            f"model '{name}': weights file '{weights}' ({where}) not found; train it with the command in "
            "docs/ or pass --weights PATH"
        )
    return weights, card


def load_state_dict(weights: str | os.PathLike, card: ModelCard | None = None, map_location: str = "cpu") -> dict:
    """Verify the sha256 (when a card is given) and load a state dict with ``weights_only=True``."""
    import pickle

    import torch

    weights = Path(weights)
    if card is not None:
        actual = sha256_of(weights)
        if actual != card.sha256:
            raise ModelError(
                f"model '{card.name}': sha256 mismatch for '{weights}' (card says {card.sha256[:12]}..., "
                f"file is {actual[:12]}...); the file is corrupt or not the one the card describes"
            )
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise ModelError(
            f"model file '{weights}': refused; expected a plain state dict loadable with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"model file '{weights}': expected a state dict, got {type(state).__name__}")
    return state


def _build(card: ModelCard):
    module_name, _, cls_name = card.architecture.partition(":")
    if not module_name.startswith("meddl.") or not cls_name:
        raise ModelError(
            f"model '{card.name}': architecture must be 'meddl.<module>:<Class>', got '{card.architecture}'"
        )
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"model '{card.name}': unknown architecture '{card.architecture}'") from exc
    if not isinstance(card.arguments, dict):
        raise ModelError(f"model '{card.name}': the card's 'arguments' must be an object of keyword arguments, got "
                         f"{type(card.arguments).__name__}")
    try:
        return cls(**card.arguments)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model '{card.name}': the card's arguments do not build a {cls_name} ({exc})") from None


def load_model(name: str, path: str | os.PathLike | None = None, device: object = "cpu",
               architecture: str | None = None):
    """Build the network named in the card and load its verified weights; returns ``(module, card)``.

    ``architecture`` (``"module:Class"``): the kind of network the caller can use; a card of another
    (e.g. the weights of another capability given by mistake) is refused before anything is built.
    """
    weights, card_path = find_model(name, path)
    card = ModelCard.read(card_path)
    if architecture is not None and card.architecture != architecture:
        raise ModelError(f"model file {weights}: holds a '{card.name}' model ({card.architecture.split(':')[-1]}), "
                         f"expected {architecture.split(':')[-1]} weights for '{name}'")
    state = load_state_dict(weights, card)
    net = _build(card)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"model '{card.name}': weights do not fit the architecture in the card ({str(exc)[:200]})") from exc
    net.eval()
    return net.to(device), card


def save_model(net, directory: str | os.PathLike, name: str, arguments: dict[str, Any], training_data: Any,
               command: str, metrics: dict[str, Any], **extra: Any) -> ModelCard:
    """Write ``NAME.pt`` (state dict) and its card with the sha256 of what was written."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.pt"
    tmp = weights.with_suffix(".pt.tmp")
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    cls = type(net)
    card = ModelCard(name, f"{cls.__module__}:{cls.__name__}", arguments, training_data, command, metrics,
                     sha256_of(weights), extra)
    card.write(weights.with_suffix(".json"))
    return card
