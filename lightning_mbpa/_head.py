"""The head binding of :class:`~lightning_mbpa.MbPA`: which module is the output head.

MbPA splits the user's model at its output head ``g_θ``: the head's input is the memory key and
its outputs are the logits adaptation changes. The head is named (``head="model.classifier"``)
or discovered as the ``nn.Linear`` that runs last in the first forward pass; this part owns
that choice and the checks that depend on it (key width, number of classes).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn


def linear_names(module: nn.Module) -> list[str]:
    """The dotted names of a module's ``nn.Linear`` submodules (its head candidates)."""
    return [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear) and name]


class HeadBinding:
    """Which module of the model is the head, by name and (once bound to a model) by object.

    Attributes:
        name: The head's dotted name, given or discovered; what checkpoints record.
        module: The head module of the model the callback runs on (transient: not pickled).
        classes_seen: The number of outputs the head produced while adapting, for a head whose
            outputs cannot be read from its type (a generic module); transient.
    """

    def __init__(self, name: str | None) -> None:
        self.name: str | None = name
        self.module: nn.Module | None = None
        self.classes_seen: int | None = None

    # ---- pickling: the name only (the module belongs to the model)
    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])  # type: ignore[misc]

    # ---- resolution
    @staticmethod
    def resolve(model: nn.Module, name: str) -> nn.Module:
        """``model.get_submodule(name)``, or an error listing the model's ``nn.Linear`` names."""
        try:
            module: nn.Module | None = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or module is model:
            raise MisconfigurationException(
                f"MbPA(head={name!r}): {type(model).__name__} has no submodule {name!r}. "
                f"Its nn.Linear modules are: {linear_names(model)}."
            )
        return module

    def bind(self, model: nn.Module, name: str, memory_dim: int | None) -> None:
        """Bind to ``model``'s submodule ``name``, checked against the memory's key width."""
        module = self.resolve(model, name)
        self.check_width(memory_dim, module, name)
        self.module, self.name = module, name

    def bind_named(self, model: nn.Module, memory_dim: int | None) -> None:
        """Bind to the named head of ``model`` if a name is known and no module is bound."""
        if self.module is None and self.name is not None:
            self.bind(model, self.name, memory_dim)

    def found(self, model: nn.Module, module: nn.Module) -> str:
        """Bind to ``module``, a submodule of ``model`` found by discovery; returns its name."""
        name = next(name for name, sub in model.named_modules() if sub is module)
        self.module, self.name = module, name
        return name

    def require(self) -> nn.Module:
        """The bound head module, or an error saying how to name it."""
        if self.module is None:
            raise MisconfigurationException(
                "MbPA: the head is not known yet (no batch has been written by this callback); "
                "name it with `head=...`."
            )
        return self.module

    def embed(self, model: nn.Module, inputs: Any) -> Tensor:
        """The head's input in ``model(inputs)`` (``MbPA.embed``'s default), with its graph."""
        head = self.require()
        captured: list[Tensor] = []

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor):
                captured.append(args[0])

        handle = head.register_forward_pre_hook(capture)
        try:
            model(inputs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise MisconfigurationException(
                f"MbPA.embed: the head {self.name!r} ran {len(captured)} times in one "
                "forward pass over stored inputs; keys need exactly one head call. Override "
                "`MbPA.embed` to say which input is the key."
            )
        return captured[0]

    # ---- geometry
    def in_features(self, module: nn.Module | None = None) -> int | None:
        module = self.module if module is None else module
        return module.in_features if isinstance(module, nn.Linear) else None

    def out_features(self, module: nn.Module | None = None) -> int | None:
        module = self.module if module is None else module
        return module.out_features if isinstance(module, nn.Linear) else None

    def classes(self) -> int | None:
        """The head's number of outputs: a Linear's ``out_features``, else as seen adapting."""
        return self.out_features() or self.classes_seen

    def check_width(
        self, dim: int | None, module: nn.Module | None = None, name: str | None = None
    ) -> None:
        """Raise if the memory's key width ``dim`` differs from the head's input width."""
        width = self.in_features(module)
        if dim is not None and width is not None and dim != width:
            raise MisconfigurationException(
                f"MbPA: the memory holds keys of width {dim} but the head "
                f"{name or self.name!r} takes inputs of width {width}. The memory (e.g. "
                "from a checkpoint) was written by a different model; use a fresh MbPA callback "
                "(`mbpa.memory.clear()` keeps the key width) or fix `head`."
            )
