"""The generic form of :func:`~lightning_mbpa.local_adapt`, for any head: ``torch.func``
(``functional_call`` + ``vmap`` over the queries + ``grad`` of the weighted loss), in chunks of
queries sized to a memory budget. A leading ``nn.Linear`` of an ``nn.Sequential`` head stays in
the dual form (:mod:`lightning_mbpa._dual_form`); only the layers after it are copied per query.
Pure torch; the head is never mutated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_mbpa._dual_form import _key_products
from lightning_mbpa._head_layers import _may_write_its_input

# Per-query working set of the generic path, in multiples of |θ|: θx, its gradient, the
# autograd temporaries of the backward pass and the update's intermediates.
_PARAM_COPIES_PER_QUERY = 6
# On CPU, a chunk's copy of the parameters is kept near this size (cache-friendly).
_CPU_CHUNK_PARAM_BYTES = 8 * 2**20


class _HookFreeForward(nn.Module):
    """Calls ``head.forward`` directly, so that hooks on ``head`` itself are not re-entered."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head.forward(x)


def _adapt_generic(
    head: nn.Module,
    first: nn.Linear | None,
    rest: list[nn.Module],
    queries: Tensor,
    keys: Tensor,
    labels: Tensor,
    weights: Tensor,
    valid: Tensor,
    steps: int,
    lr: float,
    beta: float,
    num_classes: int,
    dtype: torch.dtype,
    memory_budget_bytes: int,
    logit_offsets: Tensor | None = None,
) -> Tensor:
    """Per-query adaptation of any head with ``torch.func``, ``vmap``-ed over query chunks.

    A head that is an ``nn.Sequential`` opening with an ``nn.Linear`` keeps that layer in dual
    form, as :func:`_adapt_linear_dual` does for a whole linear head: its weight gradients are
    sums of ``g_k·h_kᵀ`` over the neighbour keys, so the adapted layer is ``W1 + Cᵀ·H`` (``b1 +
    Cᵀ·1``) with a ``[K, H1]`` coefficient ``C`` per query; its outputs on the keys are
    ``U0 + (M + 1)·C`` and a step is ``C ← keep·C - lr·∂loss/∂U``. The rest of the head is
    adapted through ``torch.func`` on those outputs. No per-query copy of ``W1`` is made.
    ``(first, rest)`` is :func:`_leading_linear`'s split of ``head``.
    """
    module = head if first is None else nn.Sequential(*rest)
    wrapper = _HookFreeForward(module)
    with torch.inference_mode(False), torch.enable_grad():
        # Inference tensors cannot be saved for backward: work on normal copies.
        slots = _tensor_slots(wrapper)
        params = {
            n: _as_normal(p.detach(), dtype)
            for n, p in wrapper.named_parameters()
            if p.is_floating_point()
        }
        fixed = {
            n: _as_normal(t.detach(), dtype if t.is_floating_point() else None)
            for n, t in [*wrapper.named_buffers(), *wrapper.named_parameters()]
            if n not in params
        }
        keys = _as_normal(keys, dtype)
        if not bool(valid.all()):
            # 0·loss(NaN) is NaN: keep padding garbage out of the masked neighbours' losses.
            keys = torch.where(valid[..., None], keys, 0.0)
        queries = _as_normal(queries, dtype)
        weights = _as_normal(weights, dtype)
        labels = _as_normal(labels, None)
        if logit_offsets is not None:
            logit_offsets = _as_normal(logit_offsets, dtype)
        dual = first is not None

        # an in-place first layer (ReLU(inplace=True)) must not write into the caller's
        # queries and keys, nor into the inputs a gradient is taken for: it gets a copy
        copy_input = _may_write_its_input(module)

        def forward(theta: dict[str, Tensor], x: Tensor) -> Tensor:
            tensors = {**fixed, **theta}
            return functional_call(
                wrapper,
                {slot: tensors[n] for slot, n in slots.items()},
                (x.clone() if copy_input else x,),
                tie_weights=False,
            )

        def neighbour_loss(
            theta: dict[str, Tensor], inputs_q: Tensor, labels_q: Tensor, weights_q: Tensor
        ) -> Tensor:
            logits = forward(theta, inputs_q)
            if logit_offsets is not None:  # the logit-adjusted loss
                logits = logits + logit_offsets
            if num_classes == 1:
                losses = F.binary_cross_entropy_with_logits(
                    logits[:, 0], labels_q.to(logits.dtype), reduction="none"
                )
            else:
                losses = F.cross_entropy(logits, labels_q, reduction="none")
            return (weights_q * losses).sum()

        # the gradients wrt the parameters and, for a dual first layer, wrt its outputs
        loss_grad: Callable[..., Any] = grad(neighbour_loss, argnums=(0, 1) if dual else 0)
        keep = 1.0 - beta

        def adapt_one(
            query_inputs_q: Tensor,
            inputs_q: Tensor,
            labels_q: Tensor,
            weights_q: Tensor,
            *dual_q: Tensor,
        ) -> Tensor:
            theta = dict(params)
            coef = None  # C, [K, H1], of a dual first layer
            for _ in range(steps):
                if not dual_q:
                    grads = loss_grad(theta, inputs_q, labels_q, weights_q)
                else:
                    step_inputs = (
                        inputs_q if coef is None else torch.addmm(inputs_q, dual_q[0], coef)
                    )
                    grads, input_grad = loss_grad(theta, step_inputs, labels_q, weights_q)
                    if coef is None:
                        coef = input_grad * -lr
                    else:  # C ← keep·C - lr·∂loss/∂U
                        coef = torch.add(coef if beta == 0 else coef * keep, input_grad, alpha=-lr)
                theta = {n: _sgd_pull(p, grads[n], params[n], lr, beta) for n, p in theta.items()}
            if coef is not None:
                query_inputs_q = torch.addmv(query_inputs_q, coef.T, dual_q[1])
            return forward(theta, query_inputs_q[None])[0]

        batched = vmap(adapt_one)
        num_neighbours = keys.shape[1]
        width = keys.shape[2] if first is None else first.out_features
        per_query = (
            _PARAM_COPIES_PER_QUERY * sum(p.numel() for p in params.values())
            + 4 * num_neighbours * (width + num_classes)
            + (num_neighbours * (num_neighbours + 1) if dual else 0)
        )
        chunk = _chunk_size(per_query, params, dtype, keys.device, memory_budget_bytes)
        outputs = []
        for start in range(0, keys.shape[0], chunk):
            part = slice(start, start + chunk)
            products: tuple[Tensor, ...]
            if first is None:
                inputs, query_inputs, products = keys[part], queries[part], ()
            else:  # per chunk: the first layer's outputs count against the budget too
                with torch.no_grad():
                    inputs, query_inputs, products = _first_layer(
                        first, queries[part], keys[part], valid[part], dtype
                    )
            outputs.append(batched(query_inputs, inputs, labels[part], weights[part], *products))
        return torch.cat(outputs).detach()


def _tensor_slots(module: nn.Module) -> dict[str, str]:
    """``{slot: name}``: one dotted name per parameter/buffer attribute of each distinct module,
    mapped to the name ``named_parameters``/``named_buffers`` give its tensor.

    ``functional_call`` swaps tensors in by name and restores them afterwards; with a module
    used twice (``nn.Sequential(layer, act, layer)``) or a tensor shared by two modules, its
    own weight tying restores the wrong tensor and leaves the module changed (torch 2.13).
    Setting each attribute of each distinct module exactly once avoids that.
    """
    canonical: dict[int, str] = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        canonical.setdefault(id(t), name)
    slots: dict[str, str] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr, t in [*sub._parameters.items(), *sub._buffers.items()]:
            if t is None or (id(sub), attr) in seen or id(t) not in canonical:
                continue
            seen.add((id(sub), attr))
            slots[f"{prefix}.{attr}" if prefix else attr] = canonical[id(t)]
    return slots


def _first_layer(
    first: nn.Linear, queries: Tensor, keys: Tensor, valid: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Outputs of the trained first layer on the keys ``[B, K, H1]`` and queries ``[B, H1]``,
    and the :func:`_key_products` that move them (``[B, K, K]`` and ``[B, K]``)."""
    weight = first.weight.detach().to(dtype)
    bias = None if first.bias is None else first.bias.detach().to(dtype)
    gram, key_dot_query = _key_products(queries, keys, valid, bias is not None)
    key_outputs = F.linear(keys, weight, bias)
    query_outputs = F.linear(queries, weight, bias)
    return key_outputs, query_outputs, (gram, key_dot_query[:, 0, :])


def _sgd_pull(current: Tensor, gradient: Tensor, start: Tensor, lr: float, beta: float) -> Tensor:
    """``θx - lr·g - beta·(θx - θ)``, as ``lerp(θx, θ, beta) - lr·g`` in two memory passes."""
    if beta == 0 or current is start:  # at the first step θx is the shared θ
        return torch.sub(current, gradient, alpha=lr)
    return torch.lerp(current, start, beta).sub_(gradient, alpha=lr)


def _chunk_size(
    per_query: int,
    params: dict[str, Tensor],
    dtype: torch.dtype,
    device: torch.device,
    memory_budget_bytes: int,
) -> int:
    """Queries per ``vmap`` call: ``per_query`` elements each fit the budget and, on CPU, the
    chunk's copies of ``params`` stay cache-sized."""
    item = torch.empty((), dtype=dtype).element_size()
    chunk = max(1, memory_budget_bytes // (item * per_query))
    num_params = sum(p.numel() for p in params.values())
    if device.type == "cpu" and num_params:
        # Each step streams the chunk's parameter copies several times: keeping one copy
        # cache-sized is 2-4x faster on CPU than filling the budget (GPUs want big chunks).
        chunk = min(chunk, max(1, _CPU_CHUNK_PARAM_BYTES // (item * num_params)))
    return chunk


def _as_normal(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    out = t if dtype is None else t.to(dtype)
    return out.clone() if out.is_inference() else out
