"""The recommended continual-learning recipe (``examples/configs/recommended_<stream>.yaml``):
the YAMLs are the baselines runner's row, the recipe gives the same memory and accuracies through
LightningCLI and through plain Python, and on a tiny imbalanced stream it beats replay alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from examples import baselines, continual, sweep
from examples.classifier import MLPClassifier
from examples.datamodules import MNISTTaskStream
from lightning_mbpa import MbPA

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"
STREAMS = ("permuted", "class_incremental", "imbalanced")
#: a stream of seconds: 1 epoch per task, 400 training and 60 test images per task
TINY = {"max_epochs": 1, "max_train": 400, "max_eval": 60}


def tiny_args(out_dir: Path) -> list[str]:
    return [
        "--trainer.max_epochs", str(TINY["max_epochs"]),
        "--trainer.enable_progress_bar", "false",
        "--data.max_train", str(TINY["max_train"]),
        "--data.max_eval", str(TINY["max_eval"]),
        "--threads", "1",
        "--out_dir", str(out_dir),
    ]  # fmt: skip


def init_args_of(overrides: list[str]) -> dict[str, Any]:
    """``--trainer.callbacks.init_args.NAME VALUE`` pairs as YAML would read the values."""
    prefix = "--trainer.callbacks.init_args."
    pairs = zip(overrides[::2], overrides[1::2], strict=True)
    return {flag.removeprefix(prefix): yaml.safe_load(value) for flag, value in pairs}


def recipe_init_args(stream: str) -> dict[str, Any]:
    config = yaml.safe_load((CONFIGS / f"recommended_{stream}.yaml").read_text())
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_mbpa.MbPA"
    return dict(callback["init_args"])


@pytest.mark.parametrize("stream", STREAMS)
def test_recommended_yaml_is_the_stream_yaml_with_the_baselines_row(stream):
    recipe = yaml.safe_load((CONFIGS / f"recommended_{stream}.yaml").read_text())
    plain = yaml.safe_load((CONFIGS / f"{stream}.yaml").read_text())
    # the same model, data, seed and training budget as the stream's demo YAML
    for key in ("seed_everything", "model", "data", "threads"):
        assert recipe[key] == plain[key], key
    without_callbacks = {k: v for k, v in recipe["trainer"].items() if k != "callbacks"}
    assert without_callbacks == {k: v for k, v in plain["trainer"].items() if k != "callbacks"}
    # the callback: exactly what examples/baselines.py's "MbPA, recommended recipe" row sets
    row = init_args_of(baselines.ROWS["mbpa_recommended"][1])
    args = recipe_init_args(stream)
    assert args.pop("memory_size") == plain["trainer"]["callbacks"][0]["init_args"]["memory_size"]
    assert args == row
    assert args["adaptation_loss"] == "logit_adjusted" and args["head"] == "net.classifier"
    # and the recipe trains as the sweep that chose it
    assert init_args_of(sweep.RECIPE_TRAINING).items() <= args.items()


@dataclass
class Run:
    """A run of a tiny stream: accuracy after each task (task tested x after task)."""

    base: list[list[float]]
    adapted: list[list[float]]
    mbpa: MbPA
    trainer: pl.Trainer
    model: MLPClassifier
    data: MNISTTaskStream


def plain_python_run(stream: str, **changes: Any) -> Run:
    """The recipe without LightningCLI or YAML: a Trainer, the callback, the same loop
    (``changes``: callback arguments that differ from the recipe's)."""
    config = yaml.safe_load((CONFIGS / f"recommended_{stream}.yaml").read_text())
    pl.seed_everything(config["seed_everything"])
    data = MNISTTaskStream(**config["data"], max_train=TINY["max_train"], max_eval=TINY["max_eval"])
    model = MLPClassifier(**config["model"])
    mbpa = MbPA(**{**recipe_init_args(stream), **changes})
    trainer = pl.Trainer(
        max_epochs=TINY["max_epochs"],
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[mbpa],
    )
    n = data.num_tasks
    base, adapted = np.full((n, n), np.nan), np.full((n, n), np.nan)
    for t in range(n):
        continual.fit_task(trainer, model, data, t, TINY["max_epochs"])
        for j in range(t + 1):
            if mbpa.adapt_on:
                acc = continual.test_task(trainer, model, data, j)
                base[j, t], adapted[j, t] = acc["base"], acc["mbpa"]
            else:  # replay alone: the model's own accuracy
                loader = data.dataloader(j, "test")
                metrics = trainer.test(model, dataloaders=loader, verbose=False)[0]
                base[j, t] = adapted[j, t] = metrics["test/acc"]
    return Run(base.tolist(), adapted.tolist(), mbpa, trainer, model, data)


@pytest.fixture(scope="module")
def recipe_run() -> Run:
    torch.set_num_threads(1)
    return plain_python_run("imbalanced")


def cli_run(stream: str, out_dir: Path) -> tuple[dict[str, Any], MbPA]:
    captured: list[MbPA] = []
    original = continual.find_mbpa

    def find_and_keep(trainer: pl.Trainer) -> MbPA:
        captured.append(original(trainer))
        return captured[-1]

    continual.find_mbpa = find_and_keep
    try:
        result = continual.run(
            ["--config", str(CONFIGS / f"recommended_{stream}.yaml"), *tiny_args(out_dir)]
        )
    finally:
        continual.find_mbpa = original
    return result, captured[0]


def test_the_recipe_through_lightningcli_and_plain_python_agree(tmp_path, recipe_run):
    torch.set_num_threads(1)
    cli_result, cli_mbpa = cli_run("imbalanced", tmp_path)
    plain_mbpa = recipe_run.mbpa
    for name in ("adaptation_loss", "k", "adaptation_steps", "adaptation_lr", "replay_sampling"):
        assert getattr(cli_mbpa, name) == getattr(plain_mbpa, name), name
    # the same memory: every key (refreshed by the same final weights), label and stored input
    assert torch.equal(cli_mbpa.memory.keys, plain_mbpa.memory.keys)
    assert torch.equal(cli_mbpa.memory.values, plain_mbpa.memory.values)
    cli_inputs, plain_inputs = cli_mbpa.memory.payload, plain_mbpa.memory.payload
    assert cli_inputs.keys() == plain_inputs.keys() and len(cli_inputs) > 0
    for name, stored in cli_inputs.items():
        assert torch.equal(stored, plain_inputs[name])
    # the same accuracies, base and adapted, after every task
    np.testing.assert_array_equal(cli_result["base"], recipe_run.base)
    np.testing.assert_array_equal(cli_result["adapted"], recipe_run.adapted)
    assert (tmp_path / "imbalanced.json").exists()


def test_the_recipe_beats_replay_alone_on_a_tiny_imbalanced_stream(recipe_run):
    """Replay alone is the recipe's training without adaptation: with class-balanced replay the
    recipe's own base accuracy (the same weights), with uniform replay a run of its own. The
    rare classes (0-4, 5% of their images: about 20 in memory among 400) are where MbPA must
    add most; and the logit-adjusted loss must do better on them than plain cross-entropy from
    the same weights and memory."""
    final = np.asarray(recipe_run.adapted)[:, -1]
    balanced_replay = np.asarray(recipe_run.base)[:, -1]
    uniform = plain_python_run(
        "imbalanced", replay_sampling="uniform", adapt_on=[], refresh_keys="never"
    )
    uniform_replay = np.asarray(uniform.adapted)[:, -1]
    assert final.mean() >= balanced_replay.mean() + 0.10
    assert final[0] >= balanced_replay[0] + 0.20  # the rare classes
    assert final.mean() >= uniform_replay.mean() + 0.10
    assert final[0] >= uniform_replay[0] + 0.20
    # the option, not only the memory: the same weights and memory with plain cross-entropy
    recipe_run.mbpa.adaptation_loss = "cross_entropy"
    try:
        loader = recipe_run.data.dataloader(0, "test")
        trainer = recipe_run.trainer
        plain = trainer.test(recipe_run.model, dataloaders=loader, verbose=False)[0]
    finally:
        recipe_run.mbpa.adaptation_loss = "logit_adjusted"
    assert final[0] >= plain["mbpa/adapted_acc"] + 0.10


def test_recipe_sweep_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    """``examples/sweep.py --recipe``: every candidate and the grid, on a tiny stream."""
    overrides = tiny_args(Path("unused"))[:-4]  # without --threads and --out_dir
    result = sweep.main(
        ["--recipe", "--streams", "imbalanced", "--grid", "smoke", "--", *overrides]
    )
    out = capsys.readouterr().out
    for candidate in (
        "cross-entropy (the paper)",
        "weights / class memory share",
        "weights / class neighbour count",
        "adaptation_loss: logit_adjusted",
        "base_weight 0.5, logit_adjusted",
        "class_balanced memory of 500, cross_entropy",
    ):
        assert candidate in out
    chosen = result["recipe"]["chosen"]  # type: ignore[index]
    assert chosen[:3] == (8, 5, 0.01) and chosen[3] in ("cross_entropy", "logit_adjusted")
    assert "chosen: k=8, adaptation_steps=5" in out


def test_recipe_costs_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from examples import recipe_costs

    overrides = tiny_args(Path("unused"))[:-4]
    out = recipe_costs.main(["--stream", "imbalanced", "--repeats", "1", "--", *overrides])
    assert len(out) == len(recipe_costs.VARIANTS) + len(recipe_costs.TESTS)
    assert all(value > 0 for value in out.values())
    printed = capsys.readouterr().out
    assert "1036 B of key, label and norm + 3136 B of stored input" in printed
