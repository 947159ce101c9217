"""The language-model demo (examples/language_model.py) on a tiny generated corpus: no download,
no WikiText-2 files needed."""

from __future__ import annotations

import ast
import inspect
import json
import math
import random
from pathlib import Path

import pytest
import torch

from examples import language_model as lm

CONFIG = str(Path(__file__).resolve().parent.parent / "examples/configs/wikitext2_quick.yaml")


def write_corpus(folder: Path) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    for name, lines in (("valid.txt", 40), ("test.txt", 15)):
        with open(folder / name, "w") as f:
            for _ in range(lines):
                f.write(" " + " ".join(rng.choice(words[: rng.randint(4, 30)]) for _ in range(8)))
                f.write(" \n")


def tiny_args(folder: Path) -> list[str]:
    return [
        "--config",
        CONFIG,
        "--data.data_dir",
        str(folder),
        "--data.download",
        "false",
        "--data.batch_size",
        "4",
        "--data.bptt",
        "6",
        "--model.embedding_dim",
        "8",
        "--model.hidden_dim",
        "16",
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--weights",
        "[0.3, 0.5]",
        "--steps",
        "[1]",
        "--lrs",
        "[0.1, 0.5]",
        "--cache_size",
        "50",
        "--out_dir",
        str(folder / "out"),
    ]


def test_pipeline_runs_and_reports_every_row(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    result = lm.run(tiny_args(tmp_path))
    rows = result["rows"]
    assert list(rows) == [
        "base",
        "cache",
        "MbPA (cache) + base",
        "MbPA (cache) + base + memory",
        "kNN-LM",
        "MbPA+hist + base",
        "MbPA+hist + base + memory",
        "MbPA",
        "MbPA + base",
        "MbPA + base + memory",
    ]
    chosen = result["settings"]
    assert {chosen["lr"], chosen["history_lr"], chosen["cache_lr"]} <= {0.1, 0.5}
    assert all(math.isfinite(row["perplexity"]) and row["perplexity"] > 1 for row in rows.values())
    # the buckets cover every predicted test token
    n = result["tokens"]["test"]  # 4 streams of (n - 1) // 4 tokens each
    assert sum(b["tokens"] for b in result["buckets"].values()) == (n - 1) // 4 * 4
    assert Path(result["plot"]).exists()
    saved = json.loads((tmp_path / "out" / "wikitext2.json").read_text())
    assert saved["rows"]["base"]["perplexity"] == pytest.approx(rows["base"]["perplexity"])
    report = lm.report(result)
    assert "MbPA + base + memory" in report and "Wall time" in report


def test_history_rows_alone_build_no_datastore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_corpus(tmp_path)

    def no_datastore(*args: object, **kwargs: object) -> None:
        raise AssertionError("the datastore was built")

    monkeypatch.setattr(lm, "build_datastore", no_datastore)
    history_config = CONFIG.replace("wikitext2_quick.yaml", "wikitext2_history.yaml")
    args = [history_config if a == CONFIG else a for a in tiny_args(tmp_path)]
    root = ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "2"]
    result = lm.run([*args, *root])
    # the YAML's ModelCheckpoint on the held-out perplexity: its best epoch's weights are tested
    assert Path(result["checkpoint"]).is_file()
    assert Path(result["checkpoint"]).is_relative_to(tmp_path)
    assert list(result["rows"]) == [
        "base",
        "cache",
        "MbPA (cache) + base",
        "MbPA (cache) + base + memory",
    ]
    assert "lr" not in result["settings"] and result["settings"]["cache_lr"] in (0.1, 0.5)


def test_best_mixture_matches_a_brute_force_search() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, generator=g) * 5, torch.rand(50, generator=g) * 5  # NLLs
    grid = [(1 - w, w) for w in (0.1, 0.3, 0.5, 0.9)]
    best = lm.best_mixture({"a": a, "b": b}, grid)
    ppl = {
        w: math.exp(-((1 - w[1]) * (-a).exp() + w[1] * (-b).exp()).log().mean().item())
        for w in grid
    }
    assert best == min(ppl, key=ppl.get)


def test_windows_keep_stream_order_and_pad_the_last_window() -> None:
    ids = torch.arange(23)
    windows = lm.Windows(ids, batch_size=2, bptt=4)  # 2 streams of 11 tokens, windows of 4
    assert len(windows) == 3
    x, y = windows[2]
    assert x.tolist() == [[8, 9, 10, 0], [19, 20, 21, 0]]
    assert y.tolist() == [[9, 10, 11, -100], [20, 21, 22, -100]]


def test_missing_files_are_downloaded_or_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError, match=r"valid\.txt"):
        lm.WikiText2(data_dir=str(tmp_path / "none"), download=False).prepare_data()
    fetched = []

    def fake_fetch(url: str, path: Path) -> None:
        fetched.append(url)
        Path(path).write_text(" a b \n")

    monkeypatch.setattr(lm.urllib.request, "urlretrieve", fake_fetch)
    data = lm.WikiText2(data_dir=str(tmp_path / "new"))
    data.setup()
    assert fetched == [lm.URL + "valid.txt", lm.URL + "test.txt"]
    assert data.vocab == ["<eos>", "a", "b"]


def test_the_language_model_knows_nothing_of_mbpa() -> None:
    (tree,) = ast.parse(inspect.getsource(lm.WordLSTM)).body
    assert isinstance(tree, ast.ClassDef)
    tree.body = tree.body[1:]  # the docstring says so; the code must not mention it
    assert "mbpa" not in ast.unparse(tree).lower()


@pytest.mark.parametrize("name", ["wikitext2.yaml", "wikitext2_history.yaml"])
def test_full_configs_build(tmp_path: Path, name: str) -> None:
    """The full configs parse and instantiate: the best held-out epoch is kept, and every row
    shares the YAML's MbPA settings."""
    write_corpus(tmp_path)
    config = CONFIG.replace("wikitext2_quick.yaml", name)
    cli = lm.build(
        ["--config", config, "--data.data_dir", str(tmp_path), "--data.download", "false"]
    )
    kinds = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"EarlyStopping", "ModelCheckpoint", "MbPA"} <= kinds
    assert cli.trainer.checkpoint_callback.monitor == "val/ppl"
    template = lm.find_mbpa(cli.trainer)
    settings = {n: getattr(template, n) for n in lm.SHARED}
    assert settings["k"] == 32 and settings["head"] == "decoder"
    if name == "wikitext2.yaml":
        assert settings["index"] == "HNSW32" and settings["output_cache_bytes"] == 12 * 2**30
