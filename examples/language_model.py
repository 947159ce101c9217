"""MbPA for a word-level language model, with the neural cache and kNN-LM as special cases.

An ordinary LSTM language model (:class:`WordLSTM`: embedding → LSTM → linear over the
vocabulary) that knows nothing of MbPA and computes ``torchmetrics.text.Perplexity`` in its
``test_step``, carrying its hidden state across test batches. It is trained on the first 90% of
WikiText-2's *validation* split (the last 10% is held back to choose the mixture weights and the
adaptation steps) and evaluated on the test split. Every row below is the same weights with a
differently configured :class:`lightning_mbpa.MbPA` callback; the head's output is
``log(λa·p_adapted + λb·p_base + λm·p_memory)`` (``base_weight`` = λb, ``memory_weight`` = λm,
``λa = 1 − λb − λm``):

- base: the LM alone;
- cache (Grave et al., 2017): ``write_on_fit=False, online_writes=True``, λa = 0: the memory is
  the most recent test tokens, each written after it was predicted;
- kNN-LM (Khandelwal et al., 2020): the memory holds every training token (keys computed with the
  trained model), ``memory_temperature=τ``, λa = 0;
- MbPA (cache) + base, MbPA (cache) + base + memory: the head adapted, one step, on neighbours
  from the cache's memory (the test history), mixed with the base and the memory's vote;
- MbPA: the head adapted on the training neighbours (λa = 1);
- MbPA + base, and the three-way mixture MbPA + base + memory;
- MbPA+hist + base, MbPA+hist + base + memory: adapted on the training tokens plus the test
  history.

``--memories`` picks the groups: ``history`` (the cache and MbPA (cache) rows) and/or
``datastore`` (kNN-LM and every row on the training tokens).

    python examples/language_model.py --config examples/configs/wikitext2.yaml
    python examples/language_model.py --config examples/configs/wikitext2_quick.yaml
    python examples/language_model.py --config examples/configs/wikitext2_history.yaml

``valid.txt``/``test.txt`` (pytorch/examples' ``word_language_model`` format) are read from
``--data.data_dir`` and downloaded there when absent. Prints one table (test perplexity per
row) and the gain by word-frequency bucket, and writes ``<out_dir>/wikitext2.png`` (perplexity
reduction per frequency bucket) and ``wikitext2.json``. Weights and steps are chosen on the
held-out text from each component's probability of the next word (one evaluation per component;
the mixture of target probabilities is exact), then every row is one ``trainer.test`` with its
callback on the test split.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/continual.py

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from examples.continual import find_mbpa
from lightning_mbpa import EpisodicMemory, MbPA

URL = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"
FILES = ("valid.txt", "test.txt")
IGNORE = -100
# settings of the YAML's MbPA that every row's callback shares
SHARED = ("head", "k", "adaptation_lr", "beta", "kernel_eps", "memory_temperature", "index")
SHARED += ("output_cache_bytes",)
BUCKETS = ((0, 0, "unseen"), (1, 9, "1-9"), (10, 99, "10-99"), (100, 999, "100-999"))
BUCKETS += ((1000, 10**12, "1000+"),)


# ---------------------------------------------------------------------------- data
def tokenize(path: Path) -> list[str]:
    """Words of a file, one ``<eos>`` after every line (pytorch/examples' word_language_model)."""
    words: list[str] = []
    with open(path, encoding="utf8") as f:
        for line in f:
            words.extend([*line.split(), "<eos>"])
    return words


class Windows(Dataset):
    """A token stream laid out as ``batch_size`` parallel columns (pytorch/examples' batchify)
    and cut into consecutive ``bptt`` windows: item ``i`` is the whole batch ``(x, y)`` of window
    ``i``, ``[batch_size, bptt]`` each, ``y`` the next tokens. The last window is padded (x with
    0, y with -100), so every batch has the same shape and a stateful loop can carry its state."""

    def __init__(self, ids: Tensor, batch_size: int, bptt: int):
        columns = (ids.numel() - 1) // batch_size
        self.x = ids[: columns * batch_size].view(batch_size, columns)
        self.y = ids[1 : columns * batch_size + 1].view(batch_size, columns)
        self.bptt = bptt

    def __len__(self) -> int:
        return math.ceil(self.x.shape[1] / self.bptt)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[:, i * self.bptt : (i + 1) * self.bptt]
        y = self.y[:, i * self.bptt : (i + 1) * self.bptt]
        if x.shape[1] < self.bptt:
            pad = self.bptt - x.shape[1]
            x, y = F.pad(x, (0, pad), value=0), F.pad(y, (0, pad), value=IGNORE)
        return x, y


class WikiText2(pl.LightningDataModule):
    """WikiText-2's validation split (train: first ``1 − holdout``, held out: the rest) and its
    test split, as word ids (vocabulary: every word of both files, as pytorch/examples does).

    Args:
        data_dir: Folder with ``valid.txt`` and ``test.txt``; downloaded there when absent.
        batch_size: Parallel token streams per batch.
        bptt: Tokens per window (the ``T`` of the ``[B, T]`` batches).
        holdout: Fraction of the validation split held back to choose weights and steps.
        max_test_tokens: Use only the first this many test tokens (None: all of them).
        max_holdout_tokens: Choose weights and steps on only the first this many held-out
            tokens (None: all of them).
        download: Download missing files from pytorch/examples.
    """

    def __init__(
        self,
        data_dir: str = "../shared/data/wikitext-2",
        batch_size: int = 20,
        bptt: int = 35,
        holdout: float = 0.1,
        max_test_tokens: int | None = None,
        max_holdout_tokens: int | None = None,
        download: bool = True,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size, self.bptt, self.holdout = batch_size, bptt, holdout
        self.max_test_tokens, self.download = max_test_tokens, download
        self.max_holdout_tokens = max_holdout_tokens
        self.vocab: list[str] = []
        self.ids: dict[str, Tensor] = {}

    def prepare_data(self) -> None:
        for name in FILES:
            path = self.data_dir / name
            if not path.exists():
                if not self.download:
                    raise FileNotFoundError(f"{path} is missing (download=False).")
                self.data_dir.mkdir(parents=True, exist_ok=True)
                print(f"downloading {URL + name} -> {path}", flush=True)
                urllib.request.urlretrieve(URL + name, path)

    def setup(self, stage: str | None = None) -> None:
        if self.ids:
            return
        self.prepare_data()
        valid, test = (tokenize(self.data_dir / name) for name in FILES)
        self.vocab = sorted(set(valid) | set(test))
        index = {w: i for i, w in enumerate(self.vocab)}
        cut = int(len(valid) * (1 - self.holdout))
        held = valid[cut:]
        if self.max_test_tokens is not None:
            test = test[: self.max_test_tokens + 1]
        if self.max_holdout_tokens is not None:
            held = held[: self.max_holdout_tokens + 1]
        for split, words in (("train", valid[:cut]), ("holdout", held), ("test", test)):
            self.ids[split] = torch.tensor([index[w] for w in words], dtype=torch.long)

    @property
    def vocab_size(self) -> int:
        self.setup()
        return len(self.vocab)

    def loader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(Windows(self.ids[split], self.batch_size, self.bptt), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("holdout")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")


# ---------------------------------------------------------------------------- model
class WordLSTM(pl.LightningModule):
    """An ordinary word-level LSTM language model; it knows nothing of MbPA.

    Training and testing carry the hidden state across consecutive batches (truncated BPTT;
    a stateful test loop). ``test_step`` updates ``torchmetrics.text.Perplexity`` and keeps each
    token's negative log-likelihood in ``token_nll`` (for the analysis by word frequency).
    """

    def __init__(
        self,
        vocab_size: int = 0,
        embedding_dim: int = 256,
        hidden_dim: int = 256,
        dropout: float = 0.3,
        lr: float = 3e-3,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_dim, vocab_size)
        self.perplexity = torchmetrics.text.Perplexity(ignore_index=IGNORE)
        self.hidden: tuple[Tensor, Tensor] | None = None
        self.token_nll: list[Tensor] = []

    def features(self, x: Tensor, hidden: Any = None) -> tuple[Tensor, Any]:
        out, hidden = self.lstm(self.dropout(self.embedding(x)), hidden)
        return self.dropout(out), hidden

    def forward(self, x: Tensor, hidden: Any = None) -> tuple[Tensor, Any]:
        out, hidden = self.features(x, hidden)
        return self.decoder(out), hidden

    def _carry(self, hidden: Any) -> Any:
        return tuple(h.detach() for h in hidden)

    def on_train_epoch_start(self) -> None:
        self.hidden = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits, hidden = self(x, self.hidden)
        self.hidden = self._carry(hidden)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_hidden = None

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits, self.val_hidden = self(x, self.val_hidden)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        self.log("val/ppl", loss.exp(), prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self.hidden, self.token_nll = None, []

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits, self.hidden = self(x, self.hidden)
        self.perplexity.update(logits, y)
        self.log("test/ppl", self.perplexity)
        nll = F.cross_entropy(
            logits.flatten(0, 1), y.flatten(), reduction="none", ignore_index=IGNORE
        )
        self.token_nll.append(nll.view_as(y).detach().cpu())

    def on_train_epoch_end(self) -> None:
        self.hidden = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# ---------------------------------------------------------------------------- runner
class LanguageModelCLI(LightningCLI):
    """LightningCLI with the runner's own options."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out_dir", type=str, default="examples/out/language_model")
        parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads.")
        parser.add_argument("--cache_size", type=int, default=2000, help="Cache length (tokens).")
        parser.add_argument(
            "--weights",
            type=list[float],
            default=[0.05, 0.1, 0.2, 0.3, 0.5],
            help="Grid of base_weight/memory_weight values tried on the held-out text.",
        )
        parser.add_argument(
            "--steps",
            type=list[int],
            default=[1, 5],
            help="adaptation_steps values tried on the held-out text.",
        )
        parser.add_argument(
            "--lrs",
            type=list[float] | None,
            default=None,
            help="adaptation_lr values tried on the held-out text (None: the YAML's).",
        )
        parser.add_argument(
            "--memories",
            type=list[Literal["history", "datastore"]],
            default=["history", "datastore"],
            help="Rows to run besides the base LM: 'history' (the memory is the test history: "
            "the cache and MbPA on it) and/or 'datastore' (the training tokens: kNN-LM, MbPA, "
            "and MbPA on the training tokens plus the test history).",
        )
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def build(args: list[str] | None = None) -> LanguageModelCLI:
    return LanguageModelCLI(
        WordLSTM,
        WikiText2,
        run=False,
        args=args,
        save_config_callback=None,
        parser_kwargs={"description": __doc__.split("\n\n")[0]},
    )


@torch.no_grad()
def build_datastore(
    model: WordLSTM, loader: DataLoader, capacity: int, index: str
) -> EpisodicMemory:
    """Every training token's (hidden state, next word), with the trained weights, in eval mode,
    carrying the state across windows as the test loop does (kNN-LM's datastore)."""
    model.eval()
    memory = EpisodicMemory(capacity=capacity, index=index)
    hidden = None
    for x, y in loader:
        h, hidden = model.features(x, hidden)
        keep = y.reshape(-1) != IGNORE
        memory.add(h.reshape(-1, h.shape[-1])[keep], y.reshape(-1)[keep])
    return memory


def evaluate(model: WordLSTM, loader: DataLoader, mbpa: MbPA | None, label: str) -> Tensor:
    """One ``trainer.test``; returns every (non-padded) token's NLL in stream order."""
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[] if mbpa is None else [mbpa],
    )
    start = time.perf_counter()
    metrics = trainer.test(model, loader, verbose=False)[0]
    nll = torch.cat(model.token_nll, dim=1).reshape(-1)  # [B, windows·T]: each stream in order
    nll = nll[stream_targets(loader) != IGNORE]
    seconds = time.perf_counter() - start
    del trainer
    gc.collect()  # the trainer's reference cycles hold the row's memory and caches
    print(
        f"  {label}: perplexity {metrics['test/ppl']:.2f} ({seconds:.0f} s, "
        f"{nll.numel() / seconds:.0f} tokens/s)",
        flush=True,
    )
    return nll


def stream_targets(loader: DataLoader) -> Tensor:
    """Every window's next words in the order of ``evaluate``'s NLLs (padding included)."""
    return torch.cat([y for _, y in loader], dim=1).reshape(-1)


def callback(settings: dict[str, Any], memory: EpisodicMemory | None, **kwargs: Any) -> MbPA:
    """A fresh MbPA with the YAML's shared settings; ``memory``: the datastore (not copied)."""
    if memory is not None:
        kwargs["memory_size"] = memory.capacity
        settings = {k: v for k, v in settings.items() if k != "index"}  # the datastore's own
    mbpa = MbPA(**{**settings, **kwargs})
    if memory is not None:
        mbpa.memory = memory
    return mbpa


def with_history(datastore: EpisodicMemory, room: int) -> EpisodicMemory:
    """A copy of the datastore with ``room`` free slots for the test history (online writes
    then add every test token after predicting it, evicting nothing)."""
    memory = EpisodicMemory(capacity=len(datastore) + room, index=datastore.index_string)
    memory.add(datastore.keys.clone(), datastore.values.clone())
    return memory


def best_mixture(components: dict[str, Tensor], grid: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The weights (one per component) minimising the mixture's held-out perplexity, from each
    component's probability of the next word (exact for a mixture of distributions)."""
    names = list(components)
    logp = torch.stack([-components[n].double() for n in names])
    best, best_ppl = grid[0], math.inf
    for weights in grid:
        w = torch.tensor(weights, dtype=torch.float64)[:, None]
        ppl = math.exp(-torch.logsumexp(logp + w.log(), 0).mean().item())
        if ppl < best_ppl:
            best, best_ppl = weights, ppl
    return best


def run(args: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    cli = build(args)
    config = cli.config
    torch.set_num_threads(config.threads)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    template = find_mbpa(trainer)
    settings = {name: getattr(template, name) for name in SHARED}
    print(
        f"WikiText-2: {data.vocab_size} words; train {data.ids['train'].numel()}, held out "
        f"{data.ids['holdout'].numel()}, test {data.ids['test'].numel()} tokens",
        flush=True,
    )
    trainer.fit(model, datamodule=data)
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if best:  # a ModelCheckpoint on val/ppl: the epoch of the lowest held-out perplexity
        model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
        print(f"Weights of the best epoch (held-out perplexity): {best}", flush=True)
    model.eval()
    memories = set(config.memories)
    datastore = None
    if "datastore" in memories:
        datastore = build_datastore(
            model, data.loader("train"), len(data.ids["train"]), template.index
        )
    memory_free = {"adaptation_steps": 0}
    # the cache: a few thousand keys, searched exactly whatever the datastore's index
    cache = {"write_on_fit": False, "online_writes": True, "memory_size": config.cache_size}
    cache["index"] = "Flat"
    history = {"write_on_fit": True, "online_writes": True}
    ws = [float(w) for w in config.weights]
    pairs = [(1 - w, w) for w in ws]
    triples = [(1 - b - m, b, m) for b, m in itertools.product([0.0, *ws], ws) if b + m < 1]
    lrs = [float(v) for v in (config.lrs or [settings["adaptation_lr"]])]
    room = max(data.ids["holdout"].numel(), data.ids["test"].numel())

    # ---- choose weights and steps on the held-out text
    print("\nChoosing weights and steps on the held-out text:", flush=True)
    held = data.loader("holdout")
    comp = {"base": evaluate(model, held, None, "base")}

    def choose_mbpa(memory_of: Any, extra: dict[str, Any], label: str) -> tuple[int, float]:
        """The (steps, lr) of the lowest held-out perplexity with the memory ``memory_of()``;
        its NLLs go to ``comp[label]``."""
        runs = {}
        for steps, lr in itertools.product(config.steps, lrs):
            mbpa = callback(
                {**settings, "adaptation_lr": lr}, memory_of(), adaptation_steps=steps, **extra
            )
            runs[(steps, lr)] = evaluate(model, held, mbpa, f"{label}, {steps} step(s), lr {lr:g}")
        best = min(runs, key=lambda c: runs[c].mean().item())
        comp[label] = runs[best]
        return best

    def mixtures(label: str, memory: str) -> tuple[float, float, float]:
        """``(λb of MbPA + base, λb, λm of the three-way mixture)`` for the MbPA component
        ``label`` with the memory-only component ``memory``."""
        two = best_mixture({"mbpa": comp[label], "base": comp["base"]}, pairs)[1]
        three = {"mbpa": comp[label], "base": comp["base"], "memory": comp[memory]}
        _, lam_b, lam_m = best_mixture(three, triples)
        return two, lam_b, lam_m

    rows: dict[str, tuple[MbPA | None, str]] = {"base": (None, "the LM alone")}
    picked: dict[str, Any] = {}
    if "history" in memories:
        comp["cache"] = evaluate(
            model,
            held,
            callback(settings, None, **cache, **memory_free, memory_weight=1.0),
            "cache only",
        )
        c_steps, c_lr = choose_mbpa(lambda: None, cache, "MbPA (cache)")
        lam_cache = best_mixture({"base": comp["base"], "cache": comp["cache"]}, pairs)[1]
        lam_c2, lam_cb, lam_cm = mixtures("MbPA (cache)", "cache")
        mbpa_c = {**settings, "adaptation_lr": c_lr}
        picked.update(cache_size=config.cache_size, cache_steps=c_steps, cache_lr=c_lr)
        rows["cache"] = (
            callback(
                settings,
                None,
                **cache,
                **memory_free,
                base_weight=1 - lam_cache,
                memory_weight=lam_cache,
            ),
            f"test history, {config.cache_size} tokens; λb={1 - lam_cache:g}, λm={lam_cache:g}",
        )
        rows["MbPA (cache) + base"] = (
            callback(mbpa_c, None, **cache, adaptation_steps=c_steps, base_weight=lam_c2),
            f"the cache's memory, {c_steps} step(s), lr {c_lr:g}; λa={1 - lam_c2:g}, λb={lam_c2:g}",
        )
        rows["MbPA (cache) + base + memory"] = (
            callback(
                mbpa_c,
                None,
                **cache,
                adaptation_steps=c_steps,
                base_weight=lam_cb,
                memory_weight=lam_cm,
            ),
            f"the cache's memory; λa={1 - lam_cb - lam_cm:g}, λb={lam_cb:g}, λm={lam_cm:g}",
        )
    if datastore is not None:
        store = datastore
        comp["knn"] = evaluate(
            model, held, callback(settings, store, **memory_free, memory_weight=1.0), "kNN only"
        )
        comp["knn+history"] = evaluate(
            model,
            held,
            callback(
                settings, with_history(store, room), **history, **memory_free, memory_weight=1
            ),
            "kNN + history only",
        )
        best_steps, best_lr = choose_mbpa(lambda: store, {}, "MbPA")
        hist_steps, hist_lr = choose_mbpa(
            lambda: with_history(store, room), history, "MbPA, datastore + history"
        )
        lam_knn = best_mixture({"base": comp["base"], "knn": comp["knn"]}, pairs)[1]
        lam_mbpa_base, lam_b3, lam_m3 = mixtures("MbPA", "knn")
        lam_h2, lam_hb, lam_hm = mixtures("MbPA, datastore + history", "knn+history")
        mbpa_d = {**settings, "adaptation_lr": best_lr}
        mbpa_h = {**settings, "adaptation_lr": hist_lr}
        test_room = data.ids["test"].numel()
        picked.update(steps=best_steps, lr=best_lr, history_steps=hist_steps, history_lr=hist_lr)
        rows["kNN-LM"] = (
            callback(
                settings, datastore, **memory_free, base_weight=1 - lam_knn, memory_weight=lam_knn
            ),
            f"training datastore; λb={1 - lam_knn:g}, λm={lam_knn:g}",
        )
        rows["MbPA+hist + base"] = (
            callback(
                mbpa_h,
                with_history(datastore, test_room),
                **history,
                adaptation_steps=hist_steps,
                base_weight=lam_h2,
            ),
            f"datastore + test history, {hist_steps} step(s), lr {hist_lr:g}; "
            f"λa={1 - lam_h2:g}, λb={lam_h2:g}",
        )
        rows["MbPA+hist + base + memory"] = (
            callback(
                mbpa_h,
                with_history(datastore, test_room),
                **history,
                adaptation_steps=hist_steps,
                base_weight=lam_hb,
                memory_weight=lam_hm,
            ),
            f"datastore + test history; λa={1 - lam_hb - lam_hm:g}, λb={lam_hb:g}, λm={lam_hm:g}",
        )
        rows["MbPA"] = (
            callback(mbpa_d, datastore, adaptation_steps=best_steps),
            f"training datastore, {best_steps} step(s), lr {best_lr:g}; λa=1",
        )
        rows["MbPA + base"] = (
            callback(mbpa_d, datastore, adaptation_steps=best_steps, base_weight=lam_mbpa_base),
            f"λa={1 - lam_mbpa_base:g}, λb={lam_mbpa_base:g}",
        )
        rows["MbPA + base + memory"] = (
            callback(
                mbpa_d,
                datastore,
                adaptation_steps=best_steps,
                base_weight=lam_b3,
                memory_weight=lam_m3,
            ),
            f"λa={1 - lam_b3 - lam_m3:g}, λb={lam_b3:g}, λm={lam_m3:g}",
        )

    # ---- every row on the test split, through the callback
    print("\nTest split:", flush=True)
    test = data.loader("test")
    nll = {
        name: evaluate(model, test, mbpa, f"{name} ({setting})")
        for name, (mbpa, setting) in rows.items()
    }
    counts = Counter(data.ids["train"].tolist())
    targets = stream_targets(test)
    targets = targets[targets != IGNORE]
    freq = torch.tensor([counts.get(t, 0) for t in targets.tolist()])
    buckets = {}
    for low, high, label in BUCKETS:
        chosen = (freq >= low) & (freq <= high)
        buckets[label] = {
            "tokens": int(chosen.sum()),
            **{
                name: math.exp(v[chosen].mean().item()) if chosen.any() else math.nan
                for name, v in nll.items()
            },
        }
    result = {
        "vocab_size": data.vocab_size,
        "tokens": {s: int(t.numel()) for s, t in data.ids.items()},
        "rows": {
            name: {"perplexity": math.exp(nll[name].mean().item()), "setting": rows[name][1]}
            for name in rows
        },
        "buckets": buckets,
        "settings": {**settings, **picked},
        "checkpoint": best,
        "seconds": time.perf_counter() - start,
        "cpu": _cpu_name(),
    }
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "wikitext2.json").write_text(json.dumps(result, indent=1))
    result["plot"] = str(plot(result, out_dir / "wikitext2.png"))
    print(report(result))
    return result


def report(result: dict[str, Any]) -> str:
    base = result["rows"]["base"]["perplexity"]
    width = max(map(len, result["rows"]))
    lines = [
        "",
        f"Test perplexity (WikiText-2 test, {result['tokens']['test']} tokens; vocabulary "
        f"{result['vocab_size']}):",
        f"{'':{width}s} {'perplexity':>10s} {'vs base':>8s}  setting",
    ]
    for name, row in result["rows"].items():
        change = 100 * (row["perplexity"] / base - 1)
        lines.append(f"{name:{width}s} {row['perplexity']:10.2f} {change:+7.1f}%  {row['setting']}")
    names = list(result["rows"])
    lines += ["", "Perplexity by the target word's frequency in the training text:"]
    widths = [max(len(n), 8) for n in names]
    header = " ".join(f"{n:>{w}s}" for n, w in zip(names, widths, strict=True))
    lines.append(f"{'bucket':>9s} {'tokens':>7s} {header}")
    for label, bucket in result["buckets"].items():
        cells = " ".join(f"{bucket[n]:{w}.1f}" for n, w in zip(names, widths, strict=True))
        lines.append(f"{label:>9s} {bucket['tokens']:7d} {cells}")
    lines.append(
        f"Plot: {result.get('plot')}   CPU: {result['cpu']}   Wall time: {result['seconds']:.0f} s"
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Perplexity reduction vs base per frequency bucket, one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["buckets"])
    names = [n for n in result["rows"] if n != "base"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        gains = [
            100 * (1 - result["buckets"][b][name] / result["buckets"][b]["base"]) for b in labels
        ]
        ax.bar(np.arange(len(labels)) + i * width, gains, width, label=name)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
    ax.set_xlabel("frequency of the target word in the training text")
    ax.set_ylabel("perplexity reduction vs base (%)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title("WikiText-2 test: gain by word frequency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    return f"{name}, {torch.get_num_threads()} thread(s)"
    except OSError:
        pass
    return "unknown CPU"


def main(args: list[str] | None = None) -> dict[str, Any]:
    return run(args)


if __name__ == "__main__":
    main()
