"""What an adaptation head is made of: whether it is (or opens with) an ``nn.Linear`` that the
dual form can adapt, and which layers are plain ``torch.nn`` layers. Pure torch.
"""

from __future__ import annotations

from torch import nn


def _linear_head(
    head: nn.Module | None, split: tuple[nn.Linear | None, list[nn.Module]] | None = None
) -> nn.Linear | None:
    """The ``nn.Linear`` a head is (exact type), or is the only layer of, for the dual form
    (``split``: :func:`_leading_linear`'s result for ``head``, if computed already)."""
    if type(head) is nn.Linear:
        return head
    first, rest = _leading_linear(head) if split is None else split
    return first if first is not None and not rest else None


def _leading_linear(head: nn.Module | None) -> tuple[nn.Linear | None, list[nn.Module]]:
    """``(first layer, the layers after it)`` of an ``nn.Sequential`` head whose first layer
    can be adapted in dual form: a plain ``nn.Linear`` (exact type, no hooks of its own, weights
    not shared with later layers), possibly inside nested ``nn.Sequential`` containers and after
    layers that are the identity on ``[N, D]`` rows in eval mode (``nn.Identity``, ``nn.Dropout``,
    ``nn.Flatten()``). ``(None, [])`` otherwise. Hooks on ``head`` itself do not matter:
    they are never run by the adaptation. (Global hooks, ``register_module_forward_hook``,
    are not run for a layer in dual form either.)"""
    if type(head) is not nn.Sequential or "forward" in vars(head):
        return None, []
    layers = _sequential_layers(head)
    start = 0
    while start < len(layers) and _is_row_identity(layers[start]):
        start += 1
    if start == len(layers):
        return None, []
    first = layers[start]
    if type(first) is not nn.Linear or not _is_plain(first):
        return None, []
    rest = layers[start + 1 :]
    own = {id(p) for p in first.parameters()}
    if any(id(p) in own for layer in rest for p in layer.parameters()):
        return None, []
    return first, rest


def _sequential_layers(container: nn.Sequential) -> list[nn.Module]:
    """The layers of an ``nn.Sequential``, nested plain ``nn.Sequential``s flattened."""
    layers: list[nn.Module] = []
    for layer in container:
        if type(layer) is nn.Sequential and _is_plain(layer):
            layers += _sequential_layers(layer)
        else:
            layers.append(layer)
    return layers


def _is_plain(module: nn.Module) -> bool:
    """No hooks of its own and no ``forward`` patched onto the instance: calling it does
    exactly what its class's ``forward`` does."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))


def _may_write_its_input(module: nn.Module) -> bool:
    """``False`` only where the layers that see the input run a ``torch.nn`` layer's own
    ``forward`` and do not work in place (an identity layer hands the input on to the next)."""
    layers = _sequential_layers(module) if type(module) is nn.Sequential else [module]
    for layer in layers:
        if (
            not type(layer).forward.__module__.startswith("torch.nn.modules.")
            or not _is_plain(layer)
            or getattr(layer, "inplace", False)
        ):
            return True
        if not _is_row_identity(layer):
            return False
    return False


def _is_row_identity(layer: nn.Module) -> bool:
    """A layer that returns its ``[N, D]`` input unchanged in eval mode (and is plain)."""
    if not _is_plain(layer):
        return False
    if type(layer) is nn.Flatten:
        return layer.start_dim == 1 and layer.end_dim == -1
    return type(layer) in (nn.Identity, nn.Dropout, nn.AlphaDropout)
