"""Tests of `lightning_mbpa.adaptation` against a literal per-query reference."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_mbpa._head_layers import _leading_linear, _linear_head, _may_write_its_input
from lightning_mbpa.adaptation import kernel_weights, local_adapt

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


# ----------------------------------------------------------------------------- reference


def reference_adapt(
    head: nn.Module,
    queries: Tensor,
    keys: Tensor,
    labels: Tensor,
    weights: Tensor,
    steps: int,
    lr: float,
    beta: float,
) -> Tensor:
    """The textbook loop: deep copy, fresh SGD, weighted loss, backward, step, then the pull.

    Only the weighted neighbours are used, so masked ones may hold any key or label.
    """
    outputs = []
    for b in range(queries.shape[0]):
        model = copy.deepcopy(head).eval()
        for p in model.parameters():
            p.requires_grad_(True)
        theta = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        used = weights[b] > 0
        h, y, w = keys[b][used], labels[b][used], weights[b][used]
        for _ in range(steps if bool(used.any()) else 0):
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            logits = model(h)
            if logits.shape[1] == 1:
                losses = F.binary_cross_entropy_with_logits(
                    logits[:, 0], y.to(logits.dtype), reduction="none"
                )
            else:
                losses = F.cross_entropy(logits, y, reduction="none")
            (w * losses).sum().backward()
            opt.step()  # θx - lr·∇L(θx)
            with torch.no_grad():  # ... - beta·(θx - θ), with θx taken before the step
                for p, p_before, p0 in zip(model.parameters(), before, theta, strict=True):
                    p -= beta * (p_before - p0)
        with torch.no_grad():
            outputs.append(model(queries[b : b + 1])[0])
    return torch.stack(outputs)


# ------------------------------------------------------------------------------ problems


@dataclass
class Problem:
    head: nn.Module
    queries: Tensor
    keys: Tensor
    labels: Tensor
    weights: Tensor
    steps: int
    lr: float
    beta: float

    def args(self) -> tuple:
        return (
            self.head,
            self.queries,
            self.keys,
            self.labels,
            self.weights,
            self.steps,
            self.lr,
            self.beta,
        )

    def to(self, dtype: torch.dtype) -> Problem:
        return Problem(
            copy.deepcopy(self.head).to(dtype),
            self.queries.to(dtype),
            self.keys.to(dtype),
            self.labels,
            self.weights.to(dtype),
            self.steps,
            self.lr,
            self.beta,
        )


class PlainLinear(nn.Linear):
    """Computes what ``nn.Linear`` does, but is not of its exact type: no dual form."""


def make_head(kind: str, dim: int, classes: int, seed: int, activation: str = "relu") -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(dim, classes)
    if kind == "linear_nobias":
        return nn.Linear(dim, classes, bias=False)
    hidden = 7
    # "mlp_plain_first" opens with a Linear subclass: the generic path without a dual first layer
    first = PlainLinear if kind == "mlp_plain_first" else nn.Linear
    layers: list[nn.Module] = [first(dim, hidden), ACTIVATIONS[activation]()]
    if kind == "mlp_dropout_bn":
        layers += [nn.Dropout(0.5), nn.BatchNorm1d(hidden)]
    layers += [nn.LayerNorm(hidden), nn.Linear(hidden, classes)]
    head = nn.Sequential(*layers)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.BatchNorm1d):  # non-trivial eval statistics
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_()
                m.bias.normal_()
    return head


def make_problem(
    head: nn.Module,
    batch: int,
    neighbours: int,
    dim: int,
    classes: int,
    steps: int,
    lr: float,
    beta: float,
    seed: int,
    mask_rate: float = 0.3,
    nan_padding: bool = False,
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, dim, generator=gen)
    keys = queries[:, None, :] + torch.randn(batch, neighbours, dim, generator=gen)
    labels = torch.randint(0, max(classes, 2), (batch, neighbours), generator=gen)
    mask = torch.rand(batch, neighbours, generator=gen) >= mask_rate
    distances = ((queries[:, None, :] - keys) ** 2).sum(-1)
    weights = kernel_weights(distances, mask)
    labels = torch.where(mask, labels, -1)  # padding labels are out of range on purpose
    if nan_padding:
        keys = torch.where(mask[..., None], keys, float("nan"))
    return Problem(head, queries, keys, labels, weights, steps, lr, beta)


@st.composite
def problems(draw: st.DrawFn, kinds: tuple[str, ...]) -> Problem:
    kind = draw(st.sampled_from(kinds))
    classes = draw(st.sampled_from([1, 2, 10]))
    dim = draw(st.integers(1, 6))
    head = make_head(
        kind,
        dim,
        classes,
        draw(st.integers(0, 2**16)),
        draw(st.sampled_from(sorted(ACTIVATIONS))),
    )
    return make_problem(
        head,
        batch=draw(st.integers(1, 4)),
        neighbours=draw(st.integers(1, 5)),
        dim=dim,
        classes=classes,
        steps=draw(st.integers(0, 6)),
        lr=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
        beta=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        seed=draw(st.integers(0, 2**16)),
        mask_rate=draw(st.sampled_from([0.0, 0.3, 0.7])),
        nan_padding=draw(st.booleans()),
    )


def assert_close_rel(actual: Tensor, expected: Tensor, tol: float) -> None:
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype
        assert torch.equal(after[k], v), k


# ------------------------------------------------------------------------ kernel_weights


def test_kernel_weights_matches_formula() -> None:
    d = torch.tensor([[0.0, 1.0, 3.0, 2.0], [4.0, -1e-7, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    w = kernel_weights(d, mask, eps=0.5)
    raw = 1 / (0.5 + d.clamp(min=0))
    expected = torch.where(mask, raw, 0)
    expected[:2] /= expected[:2].sum(-1, keepdim=True)
    torch.testing.assert_close(w, expected)
    assert (w[~mask] == 0).all()
    assert torch.equal(w[2], torch.zeros(4))  # no valid neighbour: zeros, not NaN
    torch.testing.assert_close(w[:2].sum(-1), torch.ones(2))


def test_kernel_weights_ignores_garbage_under_mask() -> None:
    d = torch.tensor([[1.0, float("nan"), float("inf")]])
    w = kernel_weights(d, torch.tensor([[True, False, False]]))
    assert torch.equal(w, torch.tensor([[1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_kernel_weights_rejects_bad_eps(eps: float) -> None:
    with pytest.raises(ValueError, match="`eps`"):
        kernel_weights(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), eps=eps)


def test_kernel_weights_rejects_bad_mask() -> None:
    with pytest.raises(ValueError, match="`mask`"):
        kernel_weights(torch.ones(1, 2), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`mask`.*bool"):
        kernel_weights(torch.ones(1, 2), torch.ones(1, 2))


# -------------------------------------------------------------- agreement with reference


@settings(max_examples=60, deadline=None)
@given(problems(("linear", "linear_nobias")))
def test_dual_path_matches_reference(problem: Problem) -> None:
    p64 = problem.to(torch.float64)
    expected = reference_adapt(*p64.args())
    assert_close_rel(local_adapt(*p64.args()), expected, 1e-5)
    out32 = local_adapt(*problem.to(torch.float32).args())
    assert out32.dtype == torch.float32
    assert_close_rel(out32.double(), expected, 1e-4)


@settings(max_examples=30, deadline=None)
@given(problems(("mlp", "mlp_dropout_bn", "mlp_plain_first")))
def test_generic_path_matches_reference(problem: Problem) -> None:
    p64 = problem.to(torch.float64)
    expected = reference_adapt(*p64.args())
    assert_close_rel(local_adapt(*p64.args()), expected, 1e-5)
    out32 = local_adapt(*problem.to(torch.float32).args())
    assert out32.dtype == torch.float32
    assert_close_rel(out32.double(), expected, 1e-4)


@pytest.mark.parametrize("kind", ["linear", "linear_nobias"])
def test_dual_path_with_many_classes_matches_reference(kind: str) -> None:
    # Many classes (>= 64) take the keys-major layout of the dual path, few the class-major one.
    head = make_head(kind, 6, 80, seed=31)
    p = make_problem(head, 4, 6, 6, 80, steps=5, lr=0.5, beta=0.2, seed=32, nan_padding=True)
    expected = reference_adapt(*p.to(torch.float64).args())
    assert_close_rel(local_adapt(*p.to(torch.float64).args()), expected, 1e-5)
    assert_close_rel(local_adapt(*p.args()).double(), expected, 1e-4)


def test_generic_path_agrees_with_dual_path() -> None:
    head = make_head("linear", 6, 5, seed=0)
    p = make_problem(head, 8, 6, 6, 5, steps=4, lr=0.3, beta=0.2, seed=1)
    dual = local_adapt(*p.args())
    # a Sequential of one Linear is the same dual computation
    assert torch.equal(local_adapt(nn.Sequential(head), *p.args()[1:]), dual)
    plain = PlainLinear(6, 5)
    plain.load_state_dict(head.state_dict())
    generic = local_adapt(nn.Sequential(plain), *p.args()[1:])
    torch.testing.assert_close(dual, generic, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "mlp_dropout_bn"])
@pytest.mark.parametrize("classes", [1, 5])
def test_dual_first_layer_agrees_with_plain_generic_path(kind: str, classes: int) -> None:
    """An MLP head's first Linear in dual form gives what per-query copies of it give."""
    head = make_head(kind, 6, classes, seed=5).double()
    plain = copy.deepcopy(head)
    plain[0] = PlainLinear(6, 7).double()
    plain[0].load_state_dict(head[0].state_dict())
    p = make_problem(head, 9, 6, 6, classes, steps=4, lr=0.3, beta=0.2, seed=6, nan_padding=True)
    p64 = p.to(torch.float64)
    dual_first = local_adapt(*p64.args())
    generic = local_adapt(plain, *p64.args()[1:])
    torch.testing.assert_close(dual_first, generic, rtol=1e-10, atol=1e-10)
    assert not torch.equal(dual_first, local_adapt(*p64.args()[:5], 0, 0.3, 0.2))  # it adapted


def test_which_heads_get_a_dual_first_layer() -> None:
    torch.manual_seed(0)
    first = nn.Linear(4, 3)
    assert _leading_linear(nn.Sequential(first, nn.ReLU(), nn.Linear(3, 2)))[0] is first
    assert _leading_linear(nn.Sequential(PlainLinear(4, 3), nn.ReLU()))[0] is None
    assert _leading_linear(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)))[0] is None
    assert _leading_linear(nn.Linear(4, 2))[0] is None  # the whole head is dual already
    tied = nn.Sequential(first, nn.Tanh(), first)  # the first layer's weights are used again
    assert _leading_linear(tied)[0] is None
    hooked = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    handle = hooked[0].register_forward_hook(lambda *_: None)
    assert _leading_linear(hooked)[0] is None
    handle.remove()
    assert _leading_linear(hooked)[0] is hooked[0]
    handle = hooked.register_forward_hook(lambda *_: None)  # MbPA's own hook sits on the head
    assert _leading_linear(hooked)[0] is hooked[0]
    handle.remove()
    # nested containers are looked into, and layers that return [N, D] rows unchanged skipped
    inner = nn.Linear(4, 3)
    nested = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Dropout(0.5), inner, nn.ReLU()), first)
    found, rest = _leading_linear(nested)
    assert found is inner
    assert [type(m) for m in rest] == [nn.ReLU, nn.Linear]
    assert _linear_head(nn.Sequential(nn.Identity(), nn.Sequential(first))) is first
    assert _leading_linear(nn.Sequential(nn.Flatten(0), first))[0] is None
    assert _leading_linear(nn.Sequential(nn.ReLU(), first))[0] is None
    handle = nested[0].register_forward_pre_hook(lambda *_: None)  # a hook: not looked into
    assert _leading_linear(nested)[0] is None
    handle.remove()


@pytest.mark.parametrize(
    "layers",
    [
        lambda: [nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)],
        lambda: [nn.Linear(5, 6), nn.Dropout(), nn.LeakyReLU(0.1, inplace=True), nn.Linear(6, 3)],
        lambda: [nn.ReLU(inplace=True), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)],
    ],
    ids=["after_dual_first", "after_dropout", "first_layer"],
)
def test_in_place_layers_match_reference_and_leave_inputs_alone(layers) -> None:
    torch.manual_seed(13)
    head = nn.Sequential(*layers()).double()
    p = make_problem(head, 4, 5, 5, 3, steps=3, lr=0.5, beta=0.1, seed=14).to(torch.float64)
    queries, keys = p.queries.clone(), p.keys.clone()
    out = local_adapt(*p.args())
    assert torch.equal(p.queries, queries) and torch.equal(p.keys, keys)
    expected = reference_adapt(head, queries, keys, *p.args()[3:])
    assert_close_rel(out, expected, 1e-5)


def test_which_heads_get_a_copy_of_their_input() -> None:
    class Custom(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x

    assert not _may_write_its_input(nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True)))
    assert not _may_write_its_input(nn.Sequential(nn.ReLU(), nn.ReLU(inplace=True)))
    assert _may_write_its_input(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(2, 2)))
    assert _may_write_its_input(nn.Sequential(nn.Dropout(), nn.Sequential(nn.SiLU(inplace=True))))
    assert _may_write_its_input(nn.Sequential(Custom(), nn.Linear(2, 2)))
    assert _may_write_its_input(Custom())
    assert not _may_write_its_input(nn.LayerNorm(2))
    assert not _may_write_its_input(nn.Sequential(PlainLinear(2, 2)))  # nn.Linear's forward


def test_forward_patched_on_an_instance_is_respected() -> None:
    """A Sequential whose ``forward`` was replaced on the instance is not looked into."""
    for patched in ("head", "nested", "first"):
        torch.manual_seed(15)
        head = nn.Sequential(nn.Sequential(nn.Linear(4, 3)), nn.ReLU(), nn.Linear(3, 2))
        module = {"head": head, "nested": head[0], "first": head[0][0]}[patched]
        original = module.forward
        module.forward = lambda x, original=original: original(x) * 2.0
        assert _leading_linear(head)[0] is None, patched
        p = make_problem(head, 3, 4, 4, 2, steps=2, lr=0.3, beta=0.0, seed=16)
        with torch.no_grad():
            expected_base = head(p.queries)
        assert torch.equal(local_adapt(*p.args()[:5], 0, 0.3, 0.0), expected_base), patched


@pytest.mark.parametrize("classes", [1, 4])
def test_nested_head_in_train_mode_matches_reference(classes: int) -> None:
    """The demos' head shape (``net = Sequential(encoder=Sequential(Flatten, Linear, ReLU, ...),
    classifier=Linear)``), left in train mode: adapted in eval mode, dual first layer."""
    torch.manual_seed(11)
    encoder = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(6, 5), nn.ReLU())
    head = nn.Sequential(encoder, nn.Dropout(0.5), nn.Linear(5, classes)).double().train()
    assert _leading_linear(head)[0] is encoder[2]
    p = make_problem(head, 5, 6, 6, classes, steps=3, lr=0.3, beta=0.1, seed=12)
    p64 = p.to(torch.float64)
    out = local_adapt(*p64.args())
    assert head.training and all(m.training for m in head.modules())
    assert_close_rel(out, reference_adapt(*p64.args()), 1e-5)
    # a Sequential that is a Linear after identity layers takes the dual path, in eval mode
    linear = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, classes)).double().train()
    assert_close_rel(
        local_adapt(linear, *p64.args()[1:]), reference_adapt(linear, *p64.args()[1:]), 1e-5
    )


@pytest.mark.parametrize("tying", ["module_used_twice", "shared_weight"])
def test_tied_weights_match_reference_and_stay_untouched(tying: str) -> None:
    """torch.func's own weight tying leaves a module used twice holding plain (or vmap-batched)
    tensors after the call; the generic path must leave the head exactly as it was."""
    torch.manual_seed(7)
    layer = nn.Linear(4, 4)
    again = layer if tying == "module_used_twice" else nn.Linear(4, 4)
    again.weight = layer.weight
    head = nn.Sequential(layer, nn.Tanh(), again, nn.Tanh(), nn.Linear(4, 3)).double()
    parameters = dict(head.named_parameters(remove_duplicate=False))
    before = snapshot(head)
    p = make_problem(head, 5, 6, 4, 3, steps=3, lr=0.3, beta=0.1, seed=8).to(torch.float64)
    out = local_adapt(*p.args())
    assert dict(head.named_parameters(remove_duplicate=False)) == parameters  # same objects
    assert all(type(t) is nn.Parameter for t in parameters.values())
    assert_unchanged(head, before)
    assert_close_rel(out, reference_adapt(*p.args()), 1e-5)


def test_hooks_on_the_first_layer_run_on_the_plain_generic_path() -> None:
    head = make_head("mlp", 4, 3, seed=9)
    calls = []
    handle = head[0].register_forward_hook(lambda *_: calls.append("first"))
    p = make_problem(head, 3, 5, 4, 3, steps=2, lr=0.3, beta=0.1, seed=10)
    out = local_adapt(*p.args())
    handle.remove()
    assert calls  # a hook on a submodule still runs, so that layer is not in dual form
    assert_close_rel(out, reference_adapt(*p.args()), 1e-4)


def test_nested_linear_subclass_uses_generic_path_correctly() -> None:
    class ScaledLinear(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    head = ScaledLinear(4, 3).double()
    p = make_problem(head, 3, 4, 4, 3, steps=3, lr=0.2, beta=0.1, seed=2).to(torch.float64)
    assert_close_rel(local_adapt(*p.args()), reference_adapt(*p.args()), 1e-5)


# ---------------------------------------------------------------------- the MbPA contract


@pytest.mark.parametrize("kind", ["linear", "mlp_dropout_bn"])
@pytest.mark.parametrize("classes", [1, 10])
def test_one_small_step_lowers_the_neighbours_weighted_nll(kind: str, classes: int) -> None:
    head = make_head(kind, 5, classes, seed=3).double()
    p = make_problem(head, 6, 8, 5, classes, steps=1, lr=1e-2, beta=0.5, seed=4, mask_rate=0.0).to(
        torch.float64
    )
    batch, k = p.labels.shape
    # θx depends only on the neighbours, so querying each query's adapted head on its own
    # neighbour keys gives g_θx(h_k) for every k.
    neighbours_as_queries = p.keys.reshape(batch * k, -1)

    def rep(t: Tensor) -> Tensor:
        return t.repeat_interleave(k, dim=0)

    adapted = local_adapt(
        head, neighbours_as_queries, rep(p.keys), rep(p.labels), rep(p.weights), 1, p.lr, p.beta
    ).reshape(batch, k, classes)
    with torch.no_grad():
        base = head.eval()(neighbours_as_queries).reshape(batch, k, classes)

    def weighted_nll(logits: Tensor) -> Tensor:
        if classes == 1:
            losses = F.binary_cross_entropy_with_logits(
                logits[..., 0], p.labels.double(), reduction="none"
            )
        else:
            losses = F.cross_entropy(logits.transpose(1, 2), p.labels, reduction="none")
        return (p.weights * losses).sum(-1)

    assert (weighted_nll(adapted) < weighted_nll(base)).all()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_pull_toward_theta_has_a_real_effect(kind: str) -> None:
    head = make_head(kind, 5, 4, seed=5).double()
    p = make_problem(head, 5, 6, 5, 4, steps=1, lr=0.05, beta=0.0, seed=6).to(torch.float64)
    args = (p.head, p.queries, p.keys, p.labels, p.weights)
    base = local_adapt(*args, 0, p.lr, 0.0)
    # At the first step θx = θ, so the pull is exactly zero.
    torch.testing.assert_close(
        local_adapt(*args, 1, p.lr, 1.0), local_adapt(*args, 1, p.lr, 0.0), rtol=1e-12, atol=0
    )
    change = {beta: (local_adapt(*args, 20, p.lr, beta) - base).norm() for beta in (0, 0.5, 1)}
    one_step = (local_adapt(*args, 1, p.lr, 0.0) - base).norm()
    # beta=0 accumulates ~20 steps; beta=1 restarts from θ each step (~1 step); 0.5 ~2 steps.
    assert change[0] > 8 * one_step
    assert change[1] < 1.5 * one_step
    assert change[1] < change[0.5] < change[0]


def test_beta_zero_is_plain_weighted_fine_tuning() -> None:
    head = make_head("mlp", 4, 3, seed=7).double()
    p = make_problem(head, 3, 5, 4, 3, steps=5, lr=0.2, beta=0.0, seed=8).to(torch.float64)
    expected = []
    for b in range(3):
        model = copy.deepcopy(head).eval()
        opt = torch.optim.SGD(model.parameters(), lr=p.lr)
        used = p.weights[b] > 0
        for _ in range(p.steps):
            opt.zero_grad()
            logits = model(p.keys[b][used])
            F.cross_entropy(logits, p.labels[b][used], reduction="none").mul(
                p.weights[b][used]
            ).sum().backward()
            opt.step()
        with torch.no_grad():
            expected.append(model(p.queries[b : b + 1])[0])
    assert_close_rel(local_adapt(*p.args()), torch.stack(expected), 1e-7)


# ------------------------------------------------------------------- purity and contexts


@pytest.mark.parametrize("kind", ["linear", "mlp_dropout_bn"])
def test_head_is_never_mutated_and_modes_restored(kind: str) -> None:
    head = make_head(kind, 5, 3, seed=9)
    head.train()
    if kind != "linear":
        head[0].eval()  # mixed modes must come back exactly as they were
    modes = [m.training for m in head.modules()]
    before = snapshot(head)
    grads_before = [p.grad for p in head.parameters()]
    p = make_problem(head, 4, 6, 5, 3, steps=3, lr=0.5, beta=0.1, seed=10)
    for ctx in (torch.inference_mode, torch.no_grad, torch.enable_grad):
        with ctx():
            local_adapt(*p.args())
        assert_unchanged(head, before)
        assert [m.training for m in head.modules()] == modes
    bad_labels = p.labels.clone()
    bad_labels[p.weights > 0] = 99
    with pytest.raises(ValueError, match="`labels`"):  # raised with the head in eval mode
        local_adapt(p.head, p.queries, p.keys, bad_labels, p.weights, 3, 0.5, 0.1)
    assert_unchanged(head, before)
    assert [m.training for m in head.modules()] == modes
    assert [p.grad for p in head.parameters()] == grads_before
    assert all(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("kind", ["linear", "mlp_dropout_bn"])
def test_same_result_under_inference_mode_no_grad_and_grad_mode(kind: str) -> None:
    head = make_head(kind, 5, 4, seed=11)
    p = make_problem(head, 5, 6, 5, 4, steps=4, lr=0.3, beta=0.1, seed=12)
    with torch.inference_mode():
        inference = local_adapt(*p.args())
        # inputs that are themselves inference tensors
        inference_inputs = local_adapt(
            head,
            p.queries.clone(),
            p.keys.clone(),
            p.labels.clone(),
            p.weights.clone(),
            4,
            0.3,
            0.1,
        )
    with torch.no_grad():
        no_grad = local_adapt(*p.args())
    queries = p.queries.clone().requires_grad_(True)
    grad_mode = local_adapt(head, queries, p.keys, p.labels, p.weights, 4, 0.3, 0.1)
    assert not grad_mode.requires_grad
    for other in (inference_inputs, no_grad, grad_mode):
        assert torch.equal(inference, other)


def test_head_built_under_inference_mode() -> None:
    with torch.inference_mode():
        head = make_head("mlp", 4, 3, seed=13)
        p = make_problem(head, 3, 4, 4, 3, steps=2, lr=0.3, beta=0.1, seed=14)
        out = local_adapt(*p.args())
    assert_close_rel(out, reference_adapt(*p.args()), 1e-4)


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "mlp_dropout_bn"])
def test_unadapted_outputs_are_bit_exact(kind: str) -> None:
    head = make_head(kind, 5, 4, seed=15).train()
    p = make_problem(head, 6, 5, 5, 4, steps=3, lr=0.5, beta=0.1, seed=16)
    with torch.no_grad():
        base = copy.deepcopy(head).eval()(p.queries)
    assert torch.equal(local_adapt(head, p.queries, p.keys, p.labels, p.weights, 0, 0.5, 0.1), base)
    weights = p.weights.clone()
    weights[::2] = 0  # every other query has no weighted neighbour
    out = local_adapt(head, p.queries, p.keys, p.labels, weights, 3, 0.5, 0.1)
    assert torch.equal(out[::2], base[::2])
    assert not torch.equal(out[1::2], base[1::2])
    zero = torch.zeros_like(weights)
    assert torch.equal(local_adapt(head, p.queries, p.keys, p.labels, zero, 3, 0.5, 0.1), base)
    given_base = base + 1  # a provided base_outputs is what unadapted rows return
    out = local_adapt(
        head, p.queries, p.keys, p.labels, weights, 3, 0.5, 0.1, base_outputs=given_base
    )
    assert torch.equal(out[::2], given_base[::2])


def test_empty_batch() -> None:
    head = nn.Linear(3, 2)
    out = local_adapt(
        head,
        torch.zeros(0, 3),
        torch.zeros(0, 4, 3),
        torch.zeros(0, 4, dtype=torch.long),
        torch.zeros(0, 4),
        3,
        0.1,
        0.1,
    )
    assert out.shape == (0, 2)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bfloat16_head_adapts_in_float32(kind: str) -> None:
    head = make_head(kind, 6, 5, seed=17)
    p = make_problem(head, 6, 7, 6, 5, steps=4, lr=0.3, beta=0.1, seed=18)
    head16 = copy.deepcopy(head).to(torch.bfloat16)
    before = snapshot(head16)
    out = local_adapt(
        head16, p.queries.bfloat16(), p.keys.bfloat16(), p.labels, p.weights.bfloat16(), 4, 0.3, 0.1
    )
    assert out.dtype == torch.bfloat16
    assert_unchanged(head16, before)
    # The same problem in float32, from the bf16-rounded head and inputs.
    p32 = Problem(
        copy.deepcopy(head16).float(),
        p.queries.bfloat16().float(),
        p.keys.bfloat16().float(),
        p.labels,
        p.weights.bfloat16().float(),
        4,
        0.3,
        0.1,
    )
    assert_close_rel(out.float(), local_adapt(*p32.args()), 2e-2)


def test_result_dtype_follows_autocast() -> None:
    head = make_head("linear", 6, 5, seed=19)
    p = make_problem(head, 4, 5, 6, 5, steps=3, lr=0.3, beta=0.1, seed=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = head(p.queries).dtype
        out = local_adapt(*p.args())
    assert out.dtype == expected_dtype == torch.bfloat16
    assert_close_rel(out.float(), local_adapt(*p.args()), 2e-2)


def test_frozen_head_is_still_adapted() -> None:
    head = make_head("mlp", 4, 3, seed=21)
    for param in head.parameters():
        param.requires_grad_(False)  # e.g. LightningModule.freeze() before testing
    p = make_problem(head, 3, 5, 4, 3, steps=2, lr=0.3, beta=0.1, seed=22)
    assert_close_rel(local_adapt(*p.args()), reference_adapt(*p.args()), 1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_hooks_on_the_head_itself_are_not_run(kind: str) -> None:
    """MbPA's own hooks sit on the head: adapting must not re-enter them (dual and generic)."""
    head = make_head(kind, 4, 3, seed=23)
    calls = []
    handles = [
        head.register_forward_hook(lambda *_: calls.append("post")),
        head.register_forward_pre_hook(lambda *_: calls.append("pre")),
    ]
    p = make_problem(head, 3, 5, 4, 3, steps=2, lr=0.3, beta=0.1, seed=24)
    out = local_adapt(*p.args())
    for handle in handles:
        handle.remove()
    assert calls == []
    assert_close_rel(out, reference_adapt(*p.args()), 1e-4)


# ------------------------------------------------------------------ optional precomputes


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "mlp"])
@pytest.mark.parametrize("classes", [1, 6, 80])  # 80: the dual path's keys-major layout
@pytest.mark.parametrize(("beta", "mask_rate"), [(0.0, 0.0), (0.1, 0.0), (0.1, 0.3)])
def test_base_and_neighbour_outputs_change_nothing(
    kind: str, classes: int, beta: float, mask_rate: float
) -> None:
    head = make_head(kind, 5, classes, seed=25)
    p = make_problem(head, 6, 7, 5, classes, 4, 0.3, beta, seed=26, mask_rate=mask_rate)
    with torch.no_grad():
        base = head.eval()(p.queries)
        neighbour = head(p.keys)
    given = (base.clone(), neighbour.clone())
    plain = local_adapt(*p.args())
    for kwargs in (
        {"base_outputs": base},
        {"neighbour_outputs": neighbour},
        {"base_outputs": base, "neighbour_outputs": neighbour},
    ):
        torch.testing.assert_close(local_adapt(*p.args(), **kwargs), plain, rtol=1e-5, atol=1e-6)
    # the dual path updates the neighbour logits in place: in its own buffer
    assert torch.equal(base, given[0]) and torch.equal(neighbour, given[1])


@pytest.mark.parametrize("kind", ["linear", "mlp_dropout_bn"])
def test_chunking_does_not_change_the_result(kind: str) -> None:
    head = make_head(kind, 5, 4, seed=27)
    p = make_problem(head, 9, 6, 5, 4, steps=3, lr=0.3, beta=0.1, seed=28, nan_padding=True)
    one_at_a_time = local_adapt(*p.args(), memory_budget_bytes=1)
    all_at_once = local_adapt(*p.args(), memory_budget_bytes=2**40)
    torch.testing.assert_close(one_at_a_time, all_at_once, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- validation


def _valid_args() -> dict:
    return dict(
        head=nn.Linear(3, 4),
        queries=torch.randn(2, 3),
        keys=torch.randn(2, 5, 3),
        labels=torch.randint(0, 4, (2, 5)),
        weights=torch.full((2, 5), 0.2),
        steps=2,
        lr=0.1,
        beta=0.1,
    )


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"steps": -1}, r"`steps` must be an int >= 0, got -1"),
        ({"steps": 1.5}, r"`steps`.*1\.5"),
        ({"steps": True}, r"`steps`.*True"),
        ({"lr": -0.1}, r"`lr` must be a finite float >= 0, got -0\.1"),
        ({"lr": float("nan")}, r"`lr`.*nan"),
        ({"beta": 1.5}, r"`beta` must be a float in \[0, 1\], got 1\.5"),
        ({"beta": -0.1}, r"`beta`.*-0\.1"),
        ({"memory_budget_bytes": 0}, r"`memory_budget_bytes`.*>= 1, got 0"),
        ({"queries": torch.randn(3)}, r"`queries` must be .*\[B, D\]"),
        ({"keys": torch.randn(2, 5, 4)}, r"`keys` must have shape \[2, \*, 3\], got \(2, 5, 4\)"),
        ({"keys": torch.randn(3, 5, 3)}, r"`keys` must have shape \[2, \*, 3\]"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, r"`labels` must have shape \[2, 5\]"),
        ({"labels": torch.zeros(2, 5)}, r"`labels` must be an integer"),
        ({"weights": torch.ones(2, 4)}, r"`weights` must have shape \[2, 5\]"),
        ({"weights": torch.full((2, 5), -1.0)}, r"`weights` must be finite and >= 0, got -1\.0"),
        ({"weights": torch.full((2, 5), float("nan"))}, r"`weights`.*nan"),
        ({"labels": torch.full((2, 5), 4)}, r"`labels`.*\[0, 4\).*got 4"),
        ({"labels": torch.full((2, 5), -1)}, r"`labels`.*\[0, 4\).*got -1"),
        ({"base_outputs": torch.zeros(2, 5)}, r"`base_outputs` must have shape \[2, 4\]"),
        ({"neighbour_outputs": torch.zeros(2, 5, 3)}, r"`neighbour_outputs`.*\[2, 5, 4\]"),
        ({"head": "linear"}, r"`head` must be a torch.nn.Module"),
    ],
)
def test_bad_arguments_raise_value_error(change: dict, pattern: str) -> None:
    args = _valid_args()
    args.update(change)
    before = snapshot(args["head"]) if isinstance(args["head"], nn.Module) else None
    with pytest.raises(ValueError, match=pattern):
        local_adapt(**args)
    if before is not None:
        assert_unchanged(args["head"], before)


def test_binary_head_label_range() -> None:
    args = _valid_args()
    args["head"] = nn.Linear(3, 1)
    args["labels"] = torch.randint(0, 2, (2, 5))
    local_adapt(**args)
    args["labels"][1, 2] = 2
    with pytest.raises(ValueError, match=r"`labels`.*\{0, 1\}.*got 2"):
        local_adapt(**args)


def test_masked_neighbours_may_carry_any_label() -> None:
    """Zero-weight neighbours (padding) are neither range-checked nor felt by the result."""
    args = _valid_args()
    args["weights"][:, :2] = 0
    args["weights"] = args["weights"] / args["weights"].sum(1, keepdim=True)
    expected = local_adapt(**args)
    args["labels"][:, 0] = -100
    args["labels"][:, 1] = 1000
    torch.testing.assert_close(local_adapt(**args), expected, rtol=0, atol=0)


@pytest.mark.parametrize("head", [nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 4))])
def test_any_integer_label_dtype(head: nn.Module) -> None:
    args = _valid_args()
    args["head"] = head
    expected = local_adapt(**args)
    args["labels"] = args["labels"].int()
    torch.testing.assert_close(local_adapt(**args), expected)


def test_head_must_return_a_matrix() -> None:
    args = _valid_args()
    args["head"] = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))
    with pytest.raises(
        ValueError, match=r"`head` must map `queries` \[B, D\] to a tensor \[B, C\]"
    ):
        local_adapt(**args)


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["linear", "mlp_dropout_bn", "mlp_plain_first"])
@pytest.mark.parametrize("classes", [5, 80])  # class-major and keys-major dual steps
def test_cuda_matches_the_cpu_reference(kind: str, classes: int) -> None:
    head = make_head(kind, 6, classes, seed=29)
    p = make_problem(head, 8, 6, 6, classes, steps=4, lr=0.3, beta=0.1, seed=30, nan_padding=True)
    expected = reference_adapt(*p.to(torch.float64).args())
    gpu = Problem(
        copy.deepcopy(head).cuda(),
        p.queries.cuda(),
        p.keys.cuda(),
        p.labels.cuda(),
        p.weights.cuda(),
        p.steps,
        p.lr,
        p.beta,
    )
    with torch.inference_mode():
        out = local_adapt(*gpu.args())
    assert out.device.type == "cuda"
    assert_close_rel(out.cpu().double(), expected, 1e-4)
    assert_close_rel(local_adapt(*gpu.to(torch.float64).args()).cpu(), expected, 1e-5)
    with torch.autocast("cuda", dtype=torch.float16):
        half = local_adapt(*gpu.args())
    assert half.dtype == torch.float16
    assert_close_rel(half.cpu().double(), expected, 2e-2)
