"""Key drift: stored inputs, refreshed keys and sparse replay, on tiny models.

Every number is checked against an independent computation in plain PyTorch: refreshed keys
against the encoder run on the stored inputs, replay gradients against ``autograd.grad`` of the
replayed batch's cross-entropy and a hand-written SGD step.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_mbpa import EpisodicMemory, MbPA
from lightning_mbpa._drift import Drift
from tests.helpers import (
    TinyClassifier,
    assert_bit_identical,
    blobs,
    ddp_environment,
    free_port,
    loader,
    params,
    trainer,
)

ADAPT = dict(k=8, adaptation_steps=3, adaptation_lr=0.5, beta=0.1)


@pytest.fixture
def data():
    x, y = blobs(96, seed=0)
    xt, yt = blobs(40, seed=1)
    return x, y, xt, yt


def encode(model: TinyClassifier, x: Tensor) -> Tensor:
    """The head inputs of ``x`` in eval mode: what a fresh key must be."""
    was = model.training
    model.eval()
    with torch.no_grad():
        keys = model.encoder(x)
    model.train(was)
    return keys


class NormDropClassifier(TinyClassifier):
    """BatchNorm and Dropout in the encoder: refresh must use eval mode and touch no stats."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5)
        )


class DictInputs(TinyClassifier):
    """A forward that takes a nested structure: ``{"a": [B, 3], "rest": ([B, 5],)}``."""

    def forward(self, inputs):
        x = torch.cat([inputs["a"], inputs["rest"][0]], dim=1)
        return self.head(self.encoder(x))

    def _xy(self, batch):
        return batch, batch["label"]

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch), batch["label"])

    def predict_step(self, batch, batch_idx):
        return self(batch)


def dict_loader(x: Tensor, y: Tensor, batch_size: int = 16) -> DataLoader:
    rows = [{"a": x[i, :3], "rest": (x[i, 3:],), "label": y[i]} for i in range(len(x))]
    return DataLoader(rows, batch_size=batch_size)


# ---------------------------------------------------------------------- stored inputs


@pytest.mark.parametrize(
    ("eviction", "memory_size", "write_fraction"),
    [("fifo", 40, 1.0), ("reservoir", 40, 1.0), ("fifo", 1000, 0.5)],
)
def test_stored_inputs_stay_with_their_keys_and_labels(data, eviction, memory_size, write_fraction):
    """With lr=0 the encoder is fixed, so every slot's key is the encoding of its stored input."""
    x, y, _, _ = data
    model = TinyClassifier(lr=0.0)
    cb = MbPA(
        store_inputs=True,
        eviction=eviction,
        memory_size=memory_size,
        write_fraction=write_fraction,
        **ADAPT,
    )
    trainer(callbacks=[cb], max_epochs=2).fit(model, loader(x, y, shuffle=True))

    stored = cb.memory.payload["0"]
    assert len(cb.memory) == stored.shape[0] and 0 < len(cb.memory) <= memory_size
    assert torch.equal(cb.memory.keys, encode(model, stored))
    match = (stored[:, None, :] == x[None]).all(-1)  # which training image each slot holds
    assert (match.sum(1) == 1).all()
    assert torch.equal(cb.memory.values, y[match.int().argmax(1)])


def test_nested_inputs_survive_checkpoint_weights_only_load_and_pickle(tmp_path, data):
    x, y, _, _ = data
    torch.manual_seed(0)
    model = DictInputs()
    cb = MbPA(store_inputs=True, memory_size=50, **ADAPT)  # FIFO wraps: 96 written, 50 kept
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[cb, ckpt], enable_checkpointing=True).fit(model, dict_loader(x, y))
    keep = torch.arange(46, 96).roll(-4)  # FIFO slots: rows 50..95 then 46..49 in slot order
    assert torch.equal(cb.memory.payload["0"], x[keep, :3])
    assert torch.equal(cb.memory.payload["1"], x[keep, 3:])

    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][cb.state_key]
    assert torch.equal(raw["memory"]["payload"]["1"], x[keep, 3:])

    restored = MbPA(store_inputs=True, memory_size=50, refresh_keys="on_test", **ADAPT)
    trainer(callbacks=[restored]).predict(
        DictInputs(), dict_loader(x[:8], y[:8]), ckpt_path=tmp_path / "last.ckpt"
    )
    assert torch.equal(restored.memory.payload["0"], x[keep, :3])
    assert torch.equal(restored.memory.values, y[keep])

    clone = pickle.loads(pickle.dumps(cb))
    assert torch.equal(clone.memory.payload["1"], cb.memory.payload["1"])
    other = DictInputs()
    other.load_state_dict(model.state_dict())
    assert clone.refresh(other) == 50
    assert torch.equal(clone.memory.keys, encode(model, x[keep]))


def test_unsliceable_inputs_fail_naming_the_option_and_write_nothing(data):
    x, y, _, _ = data

    class Tagged(DictInputs):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self({"a": batch["a"], "rest": batch["rest"]}), batch["label"])

    rows = [
        {"a": x[i, :3], "rest": (x[i, 3:],), "name": f"img{i}", "label": y[i]} for i in range(32)
    ]
    cb = MbPA(store_inputs=True, **ADAPT)
    with pytest.raises(MisconfigurationException, match=r"store_inputs=True.*str.*extract_inputs"):
        trainer(callbacks=[cb]).fit(Tagged(), DataLoader(rows, batch_size=16))
    assert len(cb.memory) == 0 and cb.memory.payload == {}


def test_checkpoint_without_inputs_is_refused_by_store_inputs_and_loads_without(tmp_path, data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    model = TinyClassifier()
    plain = MbPA(**ADAPT)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[plain, ckpt], enable_checkpointing=True).fit(model, loader(x, y))

    wanting = MbPA(store_inputs=True, **ADAPT)
    with pytest.raises(MisconfigurationException, match=r"96 entries without stored model inputs"):
        trainer(callbacks=[wanting]).test(
            TinyClassifier(), loader(xt, yt), ckpt_path=tmp_path / "last.ckpt", verbose=False
        )
    assert len(wanting.memory) == 0  # nothing loaded

    # and a memory with inputs loads into a callback without store_inputs as keys alone
    with_inputs = MbPA(store_inputs=True, **ADAPT)
    trainer(callbacks=[with_inputs, ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)],
            enable_checkpointing=True).fit(TinyClassifier(), loader(x, y))  # fmt: skip
    keys_only = MbPA(**ADAPT)
    trainer(callbacks=[keys_only]).predict(
        TinyClassifier(), loader(xt, yt), ckpt_path=tmp_path / "b" / "last.ckpt"
    )
    assert torch.equal(keys_only.memory.keys, with_inputs.memory.keys)
    assert keys_only.memory.payload == {}


# ---------------------------------------------------------------------- refreshed keys


def test_epoch_end_refresh_equals_a_fresh_embedding_and_keeps_modes_and_stats(data):
    x, y, _, _ = data
    torch.manual_seed(0)
    model = NormDropClassifier()
    stale = MbPA(store_inputs=True, **ADAPT)
    trainer(callbacks=[stale], max_epochs=2).fit(model, loader(x, y))

    torch.manual_seed(0)
    model = NormDropClassifier()
    cb = MbPA(store_inputs=True, refresh_keys="epoch_end", refresh_batch_size=40, **ADAPT)
    result = trainer(callbacks=[cb], max_epochs=2)
    result.fit(model, loader(x, y))

    stored = cb.memory.payload["0"]
    assert torch.equal(stored, torch.cat([x, x]))
    # three forward passes of 40, 40 and 32 stored inputs, in eval mode, equal one of all 192
    assert torch.equal(cb.memory.keys, encode(model, stored))
    assert not torch.allclose(stale.memory.keys, cb.memory.keys)  # the keys had drifted
    assert "mbpa/refresh_s" in result.callback_metrics

    # the public refresh: per-module modes restored, running statistics untouched
    model.train()
    model.encoder[1].eval()
    stats = params(model)
    cb.memory.update_keys(torch.arange(5), torch.zeros(5, 16))
    assert cb.refresh(model) == 192
    assert model.training and not model.encoder[1].training and model.encoder[3].training
    assert torch.equal(cb.memory.keys, encode(model, stored))
    assert_bit_identical(stats, model)


def test_a_large_refresh_shows_a_progress_bar_and_a_small_one_does_not(data, capsys, monkeypatch):
    import lightning_mbpa._drift as drift

    x, y, _, _ = data
    model = TinyClassifier()
    cb = MbPA(store_inputs=True, refresh_batch_size=10, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    n = len(cb.memory)
    capsys.readouterr()
    assert cb.refresh(model) == n
    assert "MbPA refresh" not in capsys.readouterr().err
    monkeypatch.setattr(drift, "_ANNOUNCE_REFRESH", 10)
    assert cb.refresh(model) == n
    err = capsys.readouterr().err
    assert "MbPA refresh" in err and f"/{n} [" in err
    assert torch.equal(cb.memory.keys, encode(model, cb.memory.payload["0"]))


def test_on_test_refresh_makes_test_equal_to_a_memory_populated_with_final_weights(data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    model = TinyClassifier()
    cb = MbPA(store_inputs=True, refresh_keys="on_test", **ADAPT)
    trainer(callbacks=[cb], max_epochs=2).fit(model, loader(x, y))
    assert not torch.equal(cb.memory.keys, encode(model, cb.memory.payload["0"]))  # stale
    weights = params(model)
    refreshed = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))
    assert torch.equal(cb.memory.keys, encode(model, cb.memory.payload["0"]))
    assert_bit_identical(weights, model)

    populated = MbPA(**ADAPT)
    populated.populate(model, loader(torch.cat([x, x]), torch.cat([y, y])))
    expected = torch.cat(trainer(callbacks=[populated]).predict(model, loader(xt, yt)))
    assert torch.equal(refreshed, expected)


def test_online_writes_store_the_test_inputs_too(data):
    x, y, xt, yt = data
    model = TinyClassifier()
    cb = MbPA(store_inputs=True, online_writes=True, refresh_keys="on_test", **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    trainer(callbacks=[cb]).test(model, loader(xt, yt), verbose=False)
    assert torch.equal(cb.memory.payload["0"], torch.cat([x, xt]))
    assert torch.equal(cb.memory.values, torch.cat([y, yt]))
    assert torch.equal(cb.memory.keys[96:], encode(model, xt))  # written in eval mode


class Killed(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed


@pytest.mark.parametrize("sampling", ["uniform", "class_balanced"])
def test_crash_then_resume_replays_the_same_examples(tmp_path, data, sampling):
    x, y, _, _ = data
    kwargs = dict(
        store_inputs=True,
        memory_size=150,
        replay_every_n_steps=3,
        replay_batch_size=8,
        replay_sampling=sampling,
    )

    def run(*callbacks, ckpt_path=None):
        torch.manual_seed(0)
        model = TinyClassifier()
        cb = MbPA(**kwargs, **ADAPT)
        trainer(callbacks=[cb, *callbacks], max_epochs=3, enable_checkpointing=bool(callbacks)).fit(
            model, loader(x, y), ckpt_path=ckpt_path
        )
        return model, cb

    straight, straight_cb = run()
    with pytest.raises(Killed):  # at step 8; last.ckpt is from the end of epoch 0 (step 6)
        run(ModelCheckpoint(dirpath=tmp_path, save_last=True), CrashAt(8))
    resumed, resumed_cb = run(ModelCheckpoint(dirpath=tmp_path), ckpt_path=tmp_path / "last.ckpt")
    assert_bit_identical(params(straight), resumed)
    assert torch.equal(resumed_cb.memory.payload["0"], straight_cb.memory.payload["0"])
    assert torch.equal(resumed_cb._drift.replay_slots, straight_cb._drift.replay_slots)
    assert torch.equal(resumed_cb._drift.replay_slots, straight_cb._drift.replay_slots)


def test_refresh_of_a_memory_without_inputs_says_why(data):
    x, y, _, _ = data
    model = TinyClassifier()
    cb = MbPA(store_inputs=True, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    keys, values = cb.memory.keys.clone(), cb.memory.values.clone()
    cb.memory.clear()
    cb.memory.add(keys, values)  # by hand, without the inputs
    with pytest.raises(MisconfigurationException, match="without stored model inputs"):
        cb.refresh(model)
    assert torch.equal(cb.memory.keys, keys)


# ---------------------------------------------------------------------- replay


class GradientProbe(Callback):
    """Clones every parameter's gradient at ``on_before_optimizer_step`` (before or after MbPA's)."""

    def __init__(self) -> None:
        self.grads: list[list[Tensor]] = []
        self.params: list[list[Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.clone() for p in pl_module.parameters()])
        self.params.append([p.detach().clone() for p in pl_module.parameters()])


def test_replay_adds_exactly_the_gradient_of_the_replayed_batch(data):
    x, y, _, _ = data
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.1)
    cb = MbPA(store_inputs=True, replay_every_n_steps=2, replay_batch_size=12, **ADAPT)
    before, after = GradientProbe(), GradientProbe()
    seen: list[Tensor | None] = []

    class Reference(Callback):
        """After MbPA: the replayed batch's loss gradient, by hand, at the same weights."""

        def __init__(self) -> None:
            self.grads: list[list[Tensor] | None] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            slots = cb._drift.replay_slots
            fresh = slots is not None and (not seen or seen[-1] is not slots)
            seen.append(slots)
            if not fresh:
                self.grads.append(None)
                return
            inputs, labels = cb.memory.payload["0"][slots], cb.memory.values[slots]
            # by hand from the parameters (running the modules here would be a training write)
            w2, b2, w1, b1 = pl_module.parameters()  # head registered before the encoder
            logits = F.linear(F.relu(F.linear(inputs, w1, b1)), w2, b2)
            loss = F.cross_entropy(logits, labels)
            self.grads.append(list(torch.autograd.grad(loss, [w2, b2, w1, b1])))

    reference = Reference()
    trainer(callbacks=[before, cb, after, reference], max_steps=4).fit(model, loader(x, y))

    # steps 2 and 4 replay (memory: 16 and 48 entries); steps 1 and 3 do not
    assert [g is not None for g in reference.grads] == [False, True, False, True]
    for step, ref in enumerate(reference.grads):
        for b, a, r in zip(before.grads[step], after.grads[step], ref or [None] * 4, strict=True):
            assert torch.equal(a, b if r is None else b + r)
    # the optimizer stepped on the sum: p ← p − lr·(g_train + g_replay)
    last = [
        p.clone().sub_(g, alpha=0.1) for p, g in zip(after.params[3], after.grads[3], strict=True)
    ]
    for p, expected in zip(model.parameters(), last, strict=True):
        assert torch.equal(p.detach(), expected)
    # replay wrote nothing: four batches of 16 training images, inputs in order
    assert len(cb.memory) == 64 and torch.equal(cb.memory.payload["0"], x[:64])


def test_replay_gradients_are_unscaled_under_16_mixed(data):
    """Under 16-mixed the gradients are unscaled before ``on_before_optimizer_step``: the replay
    gradient must be added unscaled too (a missed unscale would be 65536 times too large)."""
    x, y, _, _ = data
    torch.manual_seed(0)
    model = TinyClassifier()
    cb = MbPA(store_inputs=True, replay_every_n_steps=2, replay_batch_size=16, **ADAPT)
    before, after = GradientProbe(), GradientProbe()
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", 2.0**16))
    run = trainer(callbacks=[before, cb, after], max_steps=2, plugins=[precision])
    run.fit(model, loader(x, y))
    inputs, labels = (
        cb.memory.payload["0"][cb._drift.replay_slots],
        cb.memory.values[cb._drift.replay_slots],
    )
    w2, b2, w1, b1 = (p.requires_grad_() for p in after.params[1])
    loss = F.cross_entropy(F.linear(F.relu(F.linear(inputs, w1, b1)), w2, b2), labels)
    expected = torch.autograd.grad(loss, [w2, b2, w1, b1])  # float32, by hand
    for b, a, e in zip(before.grads[1], after.grads[1], expected, strict=True):
        torch.testing.assert_close(a - b, e, rtol=2e-2, atol=2e-3)


def test_replay_leaves_normalisation_statistics_alone(data):
    x, y, _, _ = data
    torch.manual_seed(0)
    model = NormDropClassifier()
    stats: list[list[Tensor]] = []

    class Stats(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            stats.append([b.clone() for b in pl_module.encoder[1].buffers()])

    cb = MbPA(store_inputs=True, replay_every_n_steps=1, replay_batch_size=16, **ADAPT)
    trainer(callbacks=[Stats(), cb, Stats()], max_steps=3).fit(model, loader(x, y))
    assert cb._drift.replay_slots is not None
    for b_before, b_after in zip(stats[0::2], stats[1::2], strict=True):
        for u, v in zip(b_before, b_after, strict=True):
            assert torch.equal(u, v)


def test_replay_is_refused_with_manual_optimization(data):
    x, y, _, _ = data

    class Manual(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            opt.step()

    model = Manual()
    weights = params(model)
    cb = MbPA(store_inputs=True, replay_every_n_steps=1, **ADAPT)
    with pytest.raises(MisconfigurationException, match=r"replay_every_n_steps`=1.*automatic"):
        trainer(callbacks=[cb]).fit(model, loader(x, y))
    assert_bit_identical(weights, model)
    assert len(cb.memory) == 0


# ---------------------------------------------------------------------- off means off


def test_with_the_options_off_training_is_bit_identical_and_nothing_runs(data, monkeypatch):
    x, y, _, _ = data
    calls = {"embed": 0, "replay": 0, "update_keys": 0}
    for name, owner in (("embed", MbPA), ("replay", Drift), ("update_keys", EpisodicMemory)):
        real, key = getattr(owner, name), name.strip("_")

        def counting(self, *a, _real=real, _name=key, **kw):
            calls[_name] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(owner, name, counting)

    def run(*callbacks):
        torch.manual_seed(0)
        model = TinyClassifier()
        trainer(callbacks=list(callbacks), max_epochs=2).fit(model, loader(x, y, shuffle=True))
        return model

    bare = params(run())
    default = MbPA(**ADAPT)
    assert_bit_identical(bare, run(default))
    assert calls == {"embed": 0, "replay": 0, "update_keys": 0}
    storing = MbPA(store_inputs=True, **ADAPT)
    assert_bit_identical(bare, run(storing))
    assert torch.equal(storing.memory.keys, default.memory.keys)
    assert calls == {"embed": 0, "replay": 0, "update_keys": 0}
    # refreshing keys changes no weight either (it runs, in eval mode, without grad)
    assert_bit_identical(bare, run(MbPA(store_inputs=True, refresh_keys="epoch_end", **ADAPT)))
    assert calls == {"embed": 2, "replay": 0, "update_keys": 2}


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        (dict(store_inputs="yes"), ("`store_inputs`='yes'", "a bool")),
        (dict(refresh_keys="always"), ("`refresh_keys`='always'", "'never', 'on_test', 'epoch_end'")),
        (dict(refresh_keys="on_test"), ("`refresh_keys`='on_test'", "`store_inputs`=True")),
        (dict(store_inputs=True, refresh_batch_size=0), ("`refresh_batch_size`=0", ">= 1")),
        (dict(store_inputs=True, replay_every_n_steps=0), ("`replay_every_n_steps`=0", ">= 1 or None")),
        (dict(store_inputs=True, replay_every_n_steps=2.5), ("`replay_every_n_steps`=2.5", "an int")),
        (dict(replay_every_n_steps=10), ("`replay_every_n_steps`=10", "`store_inputs`=True")),
        (dict(store_inputs=True, replay_batch_size=0), ("`replay_batch_size`=0", ">= 1")),
    ],
)  # fmt: skip
def test_bad_configs_name_the_argument_the_value_and_what_is_allowed(kwargs, needles):
    with pytest.raises(MisconfigurationException) as info:
        MbPA(**kwargs)
    for needle in needles:
        assert needle in str(info.value)


# ---------------------------------------------------------------------- the memory's payload


def _memory_with_payload(index: str = "Flat") -> EpisodicMemory:
    memory = EpisodicMemory(6, eviction="fifo", index=index)
    x = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 3)
    memory.add(x, torch.arange(8), {"x": x.clone(), "id": torch.arange(8, dtype=torch.uint8)})
    return memory


@pytest.mark.parametrize("index", ["Flat", "HNSW32"])
def test_memory_payload_follows_eviction_and_update_keys_is_searched(index):
    memory = _memory_with_payload(index)  # 8 rows into 6 slots: rows 6, 7 overwrote slots 0, 1
    assert memory.payload["id"].tolist() == [6, 7, 2, 3, 4, 5]
    assert memory.payload["id"].dtype == torch.uint8 and memory.payload["x"].device.type == "cpu"
    assert torch.equal(memory.payload["x"], memory.keys)

    memory.update_keys(torch.tensor([3, 0]), torch.tensor([[100.0] * 3, [-50.0] * 3]))
    found = memory.search(torch.tensor([[99.0] * 3, [-49.0] * 3]), k=1)
    assert found.indices[:, 0].tolist() == [3, 0]
    assert torch.equal(found.keys[:, 0], torch.tensor([[100.0] * 3, [-50.0] * 3]))
    assert memory.values.tolist() == [6, 7, 2, 3, 4, 5]  # labels and payload stay
    assert memory.payload["id"].tolist() == [6, 7, 2, 3, 4, 5]

    state = memory.state_dict()
    restored = EpisodicMemory(6, index=index)
    restored.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert torch.equal(restored.payload["x"], memory.payload["x"])
    assert restored.search(torch.tensor([[99.0] * 3]), k=1).indices.item() == 3
    restored.clear()
    assert restored.payload == {}


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda m: m.add(torch.zeros(1, 3), torch.zeros(1)), "`payload` is required"),
        (lambda m: m.add(torch.zeros(1, 3), torch.zeros(1), {"x": torch.zeros(1, 3)}), "names"),
        (
            lambda m: m.add(torch.zeros(2, 3), torch.zeros(2), {"x": torch.zeros(1, 3), "id": torch.zeros(2)}),
            "N = 2 rows",
        ),
        (
            lambda m: m.add(torch.zeros(1, 3), torch.zeros(1), {"x": torch.zeros(1, 4), "id": torch.zeros(1, dtype=torch.uint8)}),
            "shape (3,)",
        ),
        (lambda m: m.update_keys(torch.tensor([6]), torch.zeros(1, 3)), "[0, 6)"),
        (lambda m: m.update_keys(torch.tensor([1, 1]), torch.zeros(2, 3)), "distinct"),
        (lambda m: m.update_keys(torch.tensor([1]), torch.zeros(1, 2)), "`keys`"),
        (lambda m: m.update_keys(torch.tensor([1]), torch.full((1, 3), float("nan"))), "finite"),
        (lambda m: m.load_state_dict({**m.state_dict(), "payload": {"x": torch.zeros(2, 3)}}), "6 rows"),
    ],
)  # fmt: skip
def test_memory_payload_misuse_is_refused_and_changes_nothing(call, needle):
    memory = _memory_with_payload()
    before = {**memory.state_dict(), **memory.payload}
    with pytest.raises(ValueError, match=None) as info:
        call(memory)
    assert needle in str(info.value)
    after = {**memory.state_dict(), **memory.payload}
    for key, value in before.items():
        if isinstance(value, Tensor):
            assert torch.equal(value, after[key]), key


def test_memory_without_payload_refuses_one_until_cleared():
    memory = EpisodicMemory(4)
    memory.add(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="holds 2 entries without one"):
        memory.add(torch.zeros(1, 3), torch.zeros(1), {"x": torch.zeros(1)})
    memory.clear()
    memory.add(torch.zeros(1, 3), torch.zeros(1), {"x": torch.ones(1)})
    assert memory.payload["x"].tolist() == [1.0]


# ---------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, directory: str) -> None:
    ddp_environment(rank, world, port)
    torch.set_num_threads(1)
    x, y = blobs(90)  # 45 per rank: batches of 16, 16, 13
    torch.manual_seed(0)
    model = NormDropClassifier()  # dropout draws differ per rank: replay gradients are averaged
    torch.manual_seed(rank)
    cb = MbPA(
        store_inputs=True,
        refresh_keys="epoch_end",
        replay_every_n_steps=1,
        replay_batch_size=8,
        write_fraction=0.5,
        **ADAPT,
    )
    trainer(callbacks=[cb], strategy="ddp", devices=world, max_epochs=2).fit(model, loader(x, y))
    torch.save(
        {
            "memory": cb.memory.state_dict(),
            "model": model.state_dict(),
            "params": dict(model.named_parameters()),
        },
        os.path.join(directory, f"rank{rank}.pt"),
    )


@pytest.mark.slow
def test_ddp_ranks_store_the_same_inputs_and_replay_to_the_same_weights(tmp_path):
    port = free_port()
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name, value in rank0["params"].items():  # BatchNorm buffers differ by DDP's design
        assert torch.equal(value, rank1["params"][name]), name
    memory0, memory1 = rank0["memory"], rank1["memory"]
    for name in ("keys", "values", "num_seen"):
        assert torch.equal(memory0[name], memory1[name]), name
    assert torch.equal(memory0["payload"]["0"], memory1["payload"]["0"])
    x, y = blobs(90)
    stored = memory0["payload"]["0"]
    assert 0 < len(stored) < 2 * 90  # write_fraction chose the same half on both ranks
    match = (stored[:, None, :] == x[None]).all(-1)
    assert (match.sum(1) == 1).all()  # every stored input is a training image of some rank
    assert torch.equal(memory0["values"], y[match.int().argmax(1)])  # with its own label
    model = NormDropClassifier()
    model.load_state_dict(rank0["model"])
    # refreshed at the last epoch end, with rank 0's weights and buffers on both ranks
    assert torch.equal(memory0["keys"], encode(model, stored))
