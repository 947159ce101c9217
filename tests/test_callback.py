"""The MbPA callback on tiny models: writing, adapting, logging, checkpoints, pickling."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

import lightning_mbpa.adaptation as adaptation_module
from lightning_mbpa import MbPA
from tests.helpers import (
    RecordDataset,
    TinyClassifier,
    assert_bit_identical,
    blobs,
    loader,
    params,
    trainer,
)
from tests.reference import adapt_one, brute_force, kernel

ADAPT = dict(adaptation_steps=3, adaptation_lr=0.5, beta=0.1)


@pytest.fixture
def data():
    x, y = blobs(96, seed=0)
    xt, yt = blobs(40, seed=1)
    return x, y, xt, yt


def fitted(data, **mbpa_kwargs):
    torch.manual_seed(0)
    x, y, _, _ = data
    model = TinyClassifier()
    cb = MbPA(**{"k": 8, **ADAPT, **mbpa_kwargs})
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    return model, cb


def reference_logits(model: TinyClassifier, cb: MbPA, xt: torch.Tensor) -> torch.Tensor:
    """Per-query loop from the memory's saved tensors, sharing no code with the library."""
    keys = cb.memory.state_dict()["keys"].numpy()
    values = cb.memory.state_dict()["values"]
    with torch.no_grad():
        queries = model.encoder(xt)
    k = min(cb.k, len(keys))
    idx, dist = brute_force(keys, queries.numpy(), k)
    weights = torch.from_numpy(kernel(dist, cb.kernel_eps)).float()
    out = []
    for i in range(len(xt)):
        nb = torch.from_numpy(idx[i])
        out.append(
            adapt_one(
                model.head,
                queries[i],
                torch.from_numpy(keys)[nb],
                values[nb],
                weights[i],
                cb.adaptation_steps,
                cb.adaptation_lr,
                cb.beta,
            )
        )
    return torch.stack(out)


def test_fit_writes_every_training_example_with_its_label(data):
    x, y, _, _ = data
    model, cb = fitted(data)
    assert cb.head_name == "head"  # found by execution order, not registration order
    assert len(cb.memory) == len(x)
    with torch.no_grad():
        expected = model.encoder(x)  # keys are written *during* training, so compare labels
    assert torch.equal(cb.memory.values, y)
    assert cb.memory.keys.shape == expected.shape and cb.memory.keys.dtype == torch.float32


def test_keys_are_the_head_inputs_at_write_time():
    """With lr=0 the encoder never changes, so the keys equal its outputs exactly."""
    x, y = blobs(48)
    model = TinyClassifier(lr=0.0)
    cb = MbPA(k=4, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    with torch.no_grad():
        assert torch.equal(cb.memory.keys, model.encoder(x))


def test_hook_counts_write_only_in_fit_adapt_only_where_asked(data, monkeypatch):
    x, y, xt, yt = data
    calls = {"add": 0, "adapt": 0}
    from lightning_mbpa.memory import EpisodicMemory

    real_add, real_adapt = EpisodicMemory.add, adaptation_module.local_adapt

    def counting_add(self, keys, *a, **kw):
        calls["add"] += keys.shape[0]  # rows, not calls: training writes reach the memory in bulk
        return real_add(self, keys, *a, **kw)

    def counting_adapt(*a, **kw):
        calls["adapt"] += 1
        return real_adapt(*a, **kw)

    monkeypatch.setattr(EpisodicMemory, "add", counting_add)
    monkeypatch.setattr("lightning_mbpa.callback.local_adapt", counting_adapt)

    model = TinyClassifier()
    cb = MbPA(k=4, adapt_on=["predict"], **ADAPT)
    t = trainer(callbacks=[cb], max_epochs=2, limit_val_batches=2, num_sanity_val_steps=1)
    t.fit(model, loader(x, y), loader(xt, yt))
    assert calls == {"add": 2 * 96, "adapt": 0}  # 96 examples per epoch; no writes in validation
    t.test(model, loader(xt, yt))
    assert calls == {"add": 192, "adapt": 0}  # test not in adapt_on
    t.predict(model, loader(xt, yt))
    assert calls == {"add": 192, "adapt": 3}  # 40 queries in batches of 16

    cb2 = MbPA(k=4, adapt_on=["validate", "test"], **ADAPT)
    cb2.memory.load_state_dict(cb.memory.state_dict())
    t2 = trainer(callbacks=[cb2])
    t2.validate(model, loader(xt, yt))
    assert calls["adapt"] == 6 and calls["add"] == 192
    t2.test(model, loader(xt, yt))
    assert calls["adapt"] == 9 and calls["add"] == 192
    t2.predict(model, loader(xt, yt))
    assert calls["adapt"] == 9


def test_test_step_sees_adapted_predictions_equal_to_a_per_query_reference(data):
    _, _, xt, yt = data
    model, cb = fitted(data)
    expected = reference_logits(model, cb, xt)
    preds = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))
    torch.testing.assert_close(preds, expected, rtol=1e-4, atol=1e-5)

    results = trainer(callbacks=[cb]).test(model, loader(xt, yt), verbose=False)[0]
    reference_acc = (expected.argmax(1) == yt).float().mean().item()
    assert results["test_acc"] == pytest.approx(reference_acc)  # the module's own metric
    assert results["mbpa/adapted_acc"] == pytest.approx(reference_acc)
    with torch.no_grad():
        base_acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert results["mbpa/base_acc"] == pytest.approx(base_acc)
    assert results["mbpa/memory_size"] == len(cb.memory)
    assert results["mbpa/queries_per_s"] > 0


def test_adaptation_changes_predictions(data):
    _, _, xt, yt = data
    model, cb = fitted(data, adaptation_steps=5, adaptation_lr=5.0, beta=0.0)
    with torch.no_grad():
        base = model(xt)
    adapted = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))
    assert not torch.allclose(base, adapted, atol=1e-3)


def test_steps_zero_gives_exactly_the_base_predictions(data):
    _, _, xt, yt = data
    model, cb = fitted(data, adaptation_steps=0)
    with torch.no_grad():
        base = model(xt)
    preds = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))
    assert torch.equal(preds, base)


class _Boom(Exception):
    pass


class FailingTest(TinyClassifier):
    def test_step(self, batch, batch_idx):
        if batch_idx == 1:
            raise _Boom("boom")
        return super().test_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        if batch_idx == 1:
            raise KeyboardInterrupt
        return super().predict_step(batch, batch_idx)


def test_weights_bit_identical_after_test_predict_and_exceptions(data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    model = FailingTest()
    cb = MbPA(k=8, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    before, memory_before = params(model), cb.memory.state_dict()

    trainer(callbacks=[cb]).test(model, loader(xt[:16], yt[:16]), verbose=False)
    assert_bit_identical(before, model)
    with pytest.raises(_Boom):
        trainer(callbacks=[cb]).test(model, loader(xt, yt), verbose=False)
    assert_bit_identical(before, model)
    assert cb._adapt_handle is None and not model.head._forward_hooks  # hooks removed
    with pytest.raises(SystemExit):  # Lightning turns KeyboardInterrupt into a graceful exit
        trainer(callbacks=[cb]).predict(model, loader(xt, yt))
    assert_bit_identical(before, model)
    assert not model.head._forward_hooks and not model.head._forward_pre_hooks
    for key, value in memory_before.items():
        assert torch.equal(value, cb.memory.state_dict()[key])
    with torch.no_grad():  # plain forward is the base model again
        assert torch.equal(model(xt), TinyClassifier.forward(model, xt))


def test_inference_mode_on_and_off_give_identical_results(data):
    _, _, xt, yt = data
    model, cb = fitted(data)
    on = torch.cat(trainer(callbacks=[cb], inference_mode=True).predict(model, loader(xt, yt)))
    off = torch.cat(trainer(callbacks=[cb], inference_mode=False).predict(model, loader(xt, yt)))
    assert torch.equal(on, off)


@pytest.mark.parametrize("kind", ["dict", "namedtuple", "dataclass"])
def test_labels_found_in_dict_namedtuple_and_dataclass_batches(kind):
    x, y = blobs(48)

    class Model(TinyClassifier):
        def _xy(self, batch):
            if isinstance(batch, dict):
                return batch["inputs"], batch["label"]
            if kind == "namedtuple":
                return batch.X, batch.Y
            return batch.inputs, batch.Target

    cb = MbPA(k=4, **ADAPT)
    collate = None
    if kind == "dataclass":
        from tests.helpers import Record

        def collate(items):
            return Record(
                torch.stack([i.inputs for i in items]), torch.stack([i.Target for i in items])
            )

    dl = DataLoader(RecordDataset(x, y, kind), batch_size=16, collate_fn=collate)
    model = Model()
    trainer(callbacks=[cb]).fit(model, dl)
    assert torch.equal(cb.memory.values, y)
    preds = torch.cat(trainer(callbacks=[cb]).predict(model, dl))
    assert preds.shape == (48, 4)


def test_label_key_and_extract_labels_override():
    x, y = blobs(32)

    class Swapped(TinyClassifier):
        def _xy(self, batch):
            return batch[1], batch[0]

    cb = MbPA(k=4, label_key=0, **ADAPT)
    trainer(callbacks=[cb]).fit(Swapped(), DataLoader(list(zip(y, x, strict=True)), batch_size=8))
    assert torch.equal(cb.memory.values, y)

    class Custom(MbPA):
        def extract_labels(self, batch):
            return batch[1] % 2

    cb = Custom(k=4, **ADAPT)
    trainer(callbacks=[cb]).fit(TinyClassifier(), loader(x, y))
    assert torch.equal(cb.memory.values, y % 2)


def test_missing_labels_fail_on_the_first_batch_showing_the_batch():
    x, _ = blobs(32)

    class Unsupervised(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return self(batch["pixels"]).pow(2).mean()

    dl = DataLoader([{"pixels": row} for row in x], batch_size=8)
    with pytest.raises(
        MisconfigurationException, match=r"cannot find labels.*'pixels': Tensor\(shape=\(8, 8\)"
    ):
        trainer(callbacks=[MbPA(k=4, **ADAPT)]).fit(Unsupervised(), dl)


class SequenceTagger(TinyClassifier):
    """Token classification: the head sees [B, T, D] and labels are [B, T] with -100 padding."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.flatten(), ignore_index=-100
        )

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_sequence_heads_write_one_memory_per_token_skipping_ignored():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 5, 8, generator=g)
    y = torch.randint(0, 4, (24, 5), generator=g)
    y[:, 3:] = -100
    cb = MbPA(k=4, **ADAPT)
    model = SequenceTagger()
    trainer(callbacks=[cb]).fit(model, loader(x, y, batch_size=8))
    assert len(cb.memory) == int((y != -100).sum())
    assert torch.equal(cb.memory.values, y[y != -100])
    preds = torch.cat(trainer(callbacks=[cb]).predict(model, loader(x, y, batch_size=8)))
    assert preds.shape == (24, 5, 4)
    # each token is adapted like a query of its own
    flat = trainer(callbacks=[cb]).predict(model, loader(x[:2], y[:2], batch_size=2))[0]
    with torch.no_grad():
        base = model(x[:2])
    assert flat.shape == base.shape and not torch.allclose(flat, base)


def test_checkpoint_round_trip_restores_the_memory(tmp_path, data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    model = TinyClassifier()
    cb = MbPA(k=8, **ADAPT)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[cb, ckpt], enable_checkpointing=True).fit(model, loader(x, y))
    path = tmp_path / "last.ckpt"

    raw = torch.load(path, weights_only=True)  # plain tensors only
    state = raw["callbacks"][cb.state_key]
    assert torch.equal(state["memory"]["keys"], cb.memory.keys)

    fresh_model, fresh_cb = TinyClassifier(), MbPA(k=8, **ADAPT)
    expected = trainer(callbacks=[cb]).test(model, loader(xt, yt), verbose=False)[0]
    got = trainer(callbacks=[fresh_cb]).test(
        fresh_model, loader(xt, yt), ckpt_path=path, verbose=False
    )[0]
    got.pop("mbpa/queries_per_s"), expected.pop("mbpa/queries_per_s")  # timing
    assert got == pytest.approx(expected)
    assert fresh_cb.head_name == "head"
    assert torch.equal(fresh_cb.memory.keys, cb.memory.keys)


class CrashOnce(Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise _Boom("killed")


def test_fit_crash_resume_continues_the_memory(tmp_path, data):
    x, y, _, _ = data
    dl = loader(x, y, batch_size=16)

    torch.manual_seed(0)
    straight = MbPA(k=8, memory_size=150, **ADAPT)
    trainer(callbacks=[straight], max_epochs=3).fit(TinyClassifier(), dl)

    torch.manual_seed(0)
    crashing = MbPA(k=8, memory_size=150, **ADAPT)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # end of every epoch
    with pytest.raises(_Boom):
        trainer(
            callbacks=[crashing, ckpt, CrashOnce(at_step=8)],
            max_epochs=3,
            enable_checkpointing=True,
        ).fit(TinyClassifier(), dl)
    assert crashing.memory.num_seen == 8 * 16  # wrote until the crash

    resumed = MbPA(k=8, memory_size=150, **ADAPT)
    trainer(
        callbacks=[resumed, ModelCheckpoint(dirpath=tmp_path)],
        max_epochs=3,
        enable_checkpointing=True,
    ).fit(TinyClassifier(), dl, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.memory.num_seen == straight.memory.num_seen == 3 * 96
    for key, value in straight.memory.state_dict().items():
        assert torch.equal(value, resumed.memory.state_dict()[key]), key


def test_pickled_callback_reattaches_to_a_new_module(data):
    _, _, xt, yt = data
    model, cb = fitted(data)
    expected = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))
    clone = pickle.loads(pickle.dumps(cb))
    other = TinyClassifier()
    other.load_state_dict(model.state_dict())
    got = torch.cat(trainer(callbacks=[clone]).predict(other, loader(xt, yt)))
    assert torch.equal(got, expected)
    assert not model.head._forward_hooks


def test_populate_fills_the_memory_of_a_model_trained_without_mbpa(data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    model = TinyClassifier()
    trainer().fit(model, loader(x, y))
    before = params(model)
    cb = MbPA(k=8, **ADAPT)
    assert cb.populate(model, loader(x, y)) == len(x)
    with torch.no_grad():
        assert torch.allclose(cb.memory.keys, model.encoder(x), atol=1e-6)
    assert torch.equal(cb.memory.values, y)
    assert_bit_identical(before, model)
    preds = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))
    torch.testing.assert_close(preds, reference_logits(model, cb, xt), rtol=1e-4, atol=1e-5)


def test_test_populates_automatically_from_the_datamodule(data):
    import lightning.pytorch as pl

    x, y, xt, yt = data

    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return loader(x, y)

        def test_dataloader(self):
            return loader(xt, yt)

    torch.manual_seed(0)
    model = TinyClassifier()
    trainer().fit(model, loader(x, y))
    cb = MbPA(k=8, **ADAPT)
    result = trainer(callbacks=[cb]).test(model, datamodule=DM(), verbose=False)[0]
    assert len(cb.memory) == len(x)
    expected = reference_logits(model, cb, xt)
    assert result["test_acc"] == pytest.approx((expected.argmax(1) == yt).float().mean().item())


def test_empty_memory_falls_back_to_base_predictions_with_a_warning(data):
    _, _, xt, yt = data
    model = TinyClassifier()
    with pytest.warns(UserWarning, match="memory is empty"):
        preds = torch.cat(
            trainer(callbacks=[MbPA(head="head", **ADAPT)]).predict(model, loader(xt, yt))
        )
    with torch.no_grad():
        assert torch.equal(preds, model(xt))


def test_online_writes_fill_the_memory_during_test(data):
    _, _, xt, yt = data
    model, cb = fitted(data, online_writes=True)
    n = len(cb.memory)
    trainer(callbacks=[cb]).test(model, loader(xt, yt), verbose=False)
    assert len(cb.memory) == n + len(xt)
    assert torch.equal(cb.memory.values[n:], yt)
    with torch.no_grad():
        torch.testing.assert_close(cb.memory.keys[n:], model.encoder(xt))


def test_write_fraction_stores_a_random_subset():
    x, y = blobs(400)
    cb = MbPA(k=4, write_fraction=0.25, **ADAPT)
    trainer(callbacks=[cb]).fit(TinyClassifier(), loader(x, y, batch_size=50))
    assert 60 <= len(cb.memory) <= 140  # Binomial(400, 0.25): mean 100, sd ~8.7


def test_head_by_name_and_wrong_name_lists_linear_modules(data):
    x, y, _, _ = data
    cb = MbPA(head="encoder.0", k=4, **ADAPT)
    trainer(callbacks=[cb]).fit(TinyClassifier(), loader(x, y))
    assert cb.memory.dim == 8  # the input of encoder.0
    with pytest.raises(
        MisconfigurationException, match=r"no submodule 'decoder'.*\['head', 'encoder.0'\]"
    ):
        trainer(callbacks=[MbPA(head="decoder", **ADAPT)]).fit(TinyClassifier(), loader(x, y))


def test_two_mbpa_callbacks_are_refused(data):
    x, y, _, _ = data
    with pytest.raises(MisconfigurationException, match="only one MbPA callback"):
        trainer(callbacks=[MbPA(head="head", **ADAPT), MbPA(**ADAPT)]).fit(
            TinyClassifier(), loader(x, y)
        )
    # identical configurations share a checkpoint key: Lightning refuses them at Trainer()
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `MbPA`"):
        trainer(callbacks=[MbPA(**ADAPT), MbPA(**ADAPT)])


def test_weights_only_checkpoint_warns_that_memory_is_dropped(tmp_path, data):
    x, y, _, _ = data
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    with pytest.warns(UserWarning, match="save_weights_only=True"):
        trainer(callbacks=[MbPA(k=4, **ADAPT), ckpt], enable_checkpointing=True).fit(
            TinyClassifier(), loader(x, y)
        )


def test_checkpoint_with_a_different_head_width_is_refused_and_nothing_loaded(tmp_path, data):
    _, cb = fitted(data)
    state = {"memory": cb.memory.state_dict(), "head": "head"}
    other = TinyClassifier(hidden=32)
    fresh = MbPA(k=8, **ADAPT)
    fresh.setup(trainer(callbacks=[fresh]), other, "test")
    with pytest.raises(MisconfigurationException, match=r"width 16 .* width 32"):
        fresh.load_state_dict(state)
    assert len(fresh.memory) == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(k=0), "k"),
        (dict(memory_size=0), "memory_size"),
        (dict(adaptation_steps=-1), "adaptation_steps"),
        (dict(adaptation_lr=-0.1), "adaptation_lr"),
        (dict(beta=1.5), "beta"),
        (dict(kernel_eps=0.0), "kernel_eps"),
        (dict(eviction="lru"), "eviction"),
        (dict(write_fraction=0.0), "write_fraction"),
        (dict(adapt_on=["train"]), "adapt_on"),
        (dict(head=""), "head"),
        (dict(index="NoSuchIndex"), "index"),
    ],
)
def test_invalid_arguments_fail_eagerly_naming_the_argument(kwargs, name):
    with pytest.raises(MisconfigurationException, match=name):
        MbPA(**kwargs)


def test_memory_and_adaptation_do_not_import_lightning():
    code = (
        "import sys, lightning_mbpa.memory, lightning_mbpa.adaptation, lightning_mbpa.batches;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_references_agree_with_numpy(data):
    """Guard the guard: the brute-force reference returns true nearest neighbours."""
    keys = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    idx, dist = brute_force(keys, keys[:3], 1)
    assert idx[:, 0].tolist() == [0, 1, 2] and np.allclose(dist, 0)


def test_generic_head_module_is_adapted(data):
    """A non-Linear head (an MLP block) goes through the generic path."""
    x, y, xt, yt = data

    class TwoLayerHead(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))

    torch.manual_seed(0)
    model = TwoLayerHead()
    cb = MbPA(head="head", k=8, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    assert cb.memory.dim == 16
    preds = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))
    torch.testing.assert_close(preds, reference_logits(model, cb, xt), rtol=1e-4, atol=1e-5)
