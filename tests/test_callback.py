"""The MbPA callback on tiny models: writing, adapting, logging, checkpoints, pickling.

Bad input and faults (invalid arguments, bad labels, NaN keys, exceptions inside test/predict,
corrupted checkpoints, a killed process, ...) are in tests/test_reliability.py.
"""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_mbpa import MbPA
from tests.helpers import (
    RecordDataset,
    TinyClassifier,
    TwoLayerHead,
    assert_bit_identical,
    blobs,
    count_writes_and_adaptations,
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
    calls = count_writes_and_adaptations(monkeypatch)

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
    with torch.no_grad():
        assert not torch.allclose(preds, model(xt), atol=1e-3)  # the comparison is not trivial

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


def test_head_by_name(data):
    x, y, _, _ = data
    cb = MbPA(head="encoder.0", k=4, **ADAPT)
    trainer(callbacks=[cb]).fit(TinyClassifier(), loader(x, y))
    assert cb.memory.dim == 8  # the input of encoder.0


def test_weights_only_checkpoint_warns_that_memory_is_dropped(tmp_path, data):
    x, y, _, _ = data
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    with pytest.warns(UserWarning, match="save_weights_only=True"):
        trainer(callbacks=[MbPA(k=4, **ADAPT), ckpt], enable_checkpointing=True).fit(
            TinyClassifier(), loader(x, y)
        )


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

    torch.manual_seed(0)
    model = TwoLayerHead()
    cb = MbPA(head="head", k=8, **ADAPT)
    trainer(callbacks=[cb]).fit(model, loader(x, y))
    assert cb.memory.dim == 16
    preds = torch.cat(trainer(callbacks=[cb]).predict(model, loader(xt, yt)))
    torch.testing.assert_close(preds, reference_logits(model, cb, xt), rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_writes_every_micro_batch_once(data):
    x, y, _, _ = data
    torch.manual_seed(0)
    model, cb = TinyClassifier(), MbPA(k=8, **ADAPT)
    trainer(callbacks=[cb], accumulate_grad_batches=3).fit(model, loader(x, y))
    # every example once, in order: 6 micro-batches of 16, 2 optimizer steps
    assert len(cb.memory) == len(x)
    assert torch.equal(cb.memory.values, y)


class TwoViews(TinyClassifier):
    """A head called twice per training step (two noisy views of each input)."""

    def training_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        return F.cross_entropy(self(x), y) + F.cross_entropy(self(x + 0.1), y)


def test_a_head_called_twice_per_step_writes_both_calls_with_their_labels(data):
    x, y, _, _ = data
    torch.manual_seed(0)
    model, cb = TwoViews(), MbPA(k=8, **ADAPT)
    seen: list[torch.Tensor] = []
    trainer(callbacks=[cb, RecordHeadInputs(seen)]).fit(model, loader(x, y))
    assert len(cb.memory) == 2 * len(x)
    # batch by batch: the first call's rows, then the second call's, each with the batch's labels
    expected = torch.cat([torch.cat([y_b, y_b]) for y_b in y.split(16)])
    assert torch.equal(cb.memory.values, expected)
    assert torch.equal(cb.memory.keys, torch.cat(seen))


class RecordHeadInputs(Callback):
    """Records every input the head sees while training, independently of MbPA's own hook."""

    def __init__(self, seen: list[torch.Tensor]) -> None:
        self.seen = seen

    def on_fit_start(self, trainer, pl_module):
        self.handle = pl_module.head.register_forward_pre_hook(
            lambda module, args: self.seen.append(args[0].detach().clone())
        )

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()


def test_lightning_cli_help_documents_every_argument():
    """LightningCLI builds ``--help`` from the signature and the docstring's Args section."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MbPA, "mbpa")
    text = " ".join(parser.format_help().split())  # undo the help formatter's line wrapping
    names = [n for n in inspect.signature(MbPA.__init__).parameters if n != "self"]
    args_doc = MbPA.__doc__.split("Args:")[1].split("Example")[0]
    for name in names:
        assert f"--mbpa.{name} " in text, f"{name} is not a CLI option"
        doc = args_doc.split(f"\n        {name}: ")[1].split("\n        ")[0]
        first_words = " ".join(doc.split()[:4])
        assert first_words in text, f"the --help text of {name} lacks its doc: {first_words!r}"
