"""What every model registry shares: `auto` and name resolution."""

from __future__ import annotations

from typing import Any

from .errors import ModelNotFound, ModelNotReady, quoted

AUTO = "auto"


class Registry:
    """Subclasses fill `models` (name -> object with `ready` and `reason`), and
    set `auto_order` (best first) and `fallback` (always ready)."""

    auto_order: tuple[str, ...] = ()
    fallback: str = ""

    def __init__(self):
        self.models: dict[str, Any] = {}

    def default_model(self) -> str:
        return next((name for name in self.auto_order if self.models[name].ready), self.fallback)

    def resolve(self, name: str) -> Any:
        name = name.strip() or AUTO
        if name == AUTO:
            name = self.default_model()
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {quoted(name)}; known: auto, {', '.join(self.models)}", field="model")
        if not model.ready:
            raise ModelNotReady(f"model {quoted(name)} is not ready: {model.reason}", field="model")
        return model
