"""The examples keep working: every stream end to end on a tiny budget, and LightningCLI
``fit`` + ``test`` on ``examples/configs/quickstart.yaml`` (the memory travels in the checkpoint)."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from examples import baselines, classifier, continual, drift, sweep

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"
TINY = [
    "--trainer.max_epochs", "1",
    "--trainer.enable_progress_bar", "false",
    "--data.max_train", "150",
    "--data.max_eval", "60",
    "--threads", "1",
]  # fmt: skip


@pytest.mark.parametrize(
    ("stream", "num_tasks"), [("permuted", 5), ("class_incremental", 2), ("imbalanced", 2)]
)
def test_stream_runs_and_reports_base_and_mbpa_accuracy(
    tmp_path: Path, stream: str, num_tasks: int
) -> None:
    result = continual.run(
        ["--config", str(CONFIGS / f"{stream}.yaml"), *TINY, "--out_dir", str(tmp_path)]
    )

    assert result["stream"] == stream and len(result["tasks"]) == num_tasks
    for key in ("base", "adapted", "model"):
        acc = np.asarray(result[key], dtype=float)
        assert acc.shape == (num_tasks, num_tasks)
        seen = np.triu(
            np.ones((num_tasks, num_tasks), dtype=bool)
        )  # task j tested after task t >= j
        assert np.isfinite(acc[seen]).all() and np.isnan(acc[~seen]).all()
        assert ((acc[seen] >= 0) & (acc[seen] <= 1)).all()
    # test_step's own metric sees the adapted predictions: it is MbPA's adapted accuracy
    np.testing.assert_allclose(result["model"], result["adapted"], atol=1e-6)
    # every training image of every epoch went into the memory
    assert result["memory_entries"] == list(
        np.cumsum(result["train_sizes"]) * result["epochs_per_task"]
    )
    assert 0 <= result["final_average"]["base"] <= 1 and 0 <= result["final_average"]["mbpa"] <= 1
    assert result["mbpa"]["k"] >= 1

    written = json.loads((tmp_path / f"{stream}.json").read_text())
    np.testing.assert_array_equal(np.asarray(written["adapted"], dtype=float), result["adapted"])
    assert (tmp_path / f"{stream}.png").stat().st_size > 0
    report = continual.report(result)
    assert "Without MbPA" in report and "With MbPA" in report


def test_runs_are_reproducible(tmp_path: Path) -> None:
    args = ["--config", str(CONFIGS / "class_incremental.yaml"), *TINY, "--out_dir", str(tmp_path)]
    first, second = continual.run(args), continual.run(args)
    for key in ("base", "adapted"):  # NaN (untested cells) compares equal here, unlike list ==
        np.testing.assert_array_equal(first[key], second[key])


def test_quickstart_fit_then_test_through_lightning_cli(tmp_path: Path) -> None:
    config = str(CONFIGS / "quickstart.yaml")
    common = [
        "--config", config,
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--data.max_train", "300",
        "--data.max_eval", "100",
    ]  # fmt: skip
    fit = classifier.main(["fit", *common, "--trainer.max_epochs", "1"])
    fitted = continual.find_mbpa(fit.trainer)
    assert len(fitted.memory) == 300

    ckpt = tmp_path / "checkpoints" / "mlp.ckpt"
    assert ckpt.is_file()
    test = classifier.main(["test", *common, "--ckpt_path", str(ckpt)])
    restored = continual.find_mbpa(test.trainer)
    assert restored is not fitted and len(restored.memory) == 300  # from the checkpoint
    metrics = {name: float(value) for name, value in test.trainer.callback_metrics.items()}
    for name in ("mbpa/base_acc", "mbpa/adapted_acc", "test/acc"):
        assert 0 <= metrics[name] <= 1 and not math.isnan(metrics[name])
    assert metrics["test/acc"] == pytest.approx(metrics["mbpa/adapted_acc"])


def test_classifier_knows_nothing_of_mbpa() -> None:
    tree = ast.parse(Path(classifier.__file__).read_text())
    imported = [
        alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert imported and not [name for name in imported if "mbpa" in name.lower()]
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "MbPA" not in names


def test_sweep_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    sweep.main(["--streams", "class_incremental", "--grid", "smoke", "--", *TINY])
    out = capsys.readouterr().out
    assert "summary: best on validation" in out and "class_incremental" in out


def test_drift_smoke(tmp_path: Path) -> None:
    drift.main(["--streams", "imbalanced", "--grid", "smoke", "--out", str(tmp_path), "--", *TINY])
    rows = json.loads((tmp_path / "drift.json").read_text())["imbalanced"]
    names = [row["variant"] for row in rows]
    assert names[:2] == ["hidden keys, stale", "hidden keys, refreshed"]
    assert names[-1] == "pixel keys (YAML)" and any("replay" in name for name in names)
    # storing inputs and refreshing keys change no weight: the same base model
    assert rows[0]["base_test"] == rows[1]["base_test"]
    for row in rows:
        assert len(row["test"]) == 2 and all(0 <= a <= 1 for a in row["test"])
        assert row["fit_s"] > 0 and row["test_s"] >= 0


def test_baselines_table(tmp_path: Path) -> None:
    """Every row of examples/baselines.py on the imbalanced stream, tiny budget."""
    result = baselines.main(
        [
            "--config", str(CONFIGS / "imbalanced.yaml"), *TINY,
            "--out_dir", str(tmp_path),
            "--ewc_lambdas", "0", "1000",
        ]
    )  # fmt: skip
    rows = {row["name"]: row for row in result["rows"]}
    names = ["naive", "ewc", "replay", "mbpa_pixel", "mbpa_hidden", "replay_cb", "mbpa_hidden_cb"]
    names.append("mbpa_recommended")
    assert [row["name"] for row in result["rows"]] == names == list(baselines.ROWS)
    assert result["tasks"] == ["0-4", "5-9"] and result["rare_task"] == 0
    seen = np.triu(np.ones((2, 2), dtype=bool))
    for row in result["rows"]:
        acc = np.asarray(row["test"], dtype=float)
        assert acc.shape == (2, 2)
        assert np.isfinite(acc[seen]).all() and np.isnan(acc[~seen]).all()
        assert ((acc[seen] >= 0) & (acc[seen] <= 1)).all()
        # test accuracies of 60 images per task: multiples of 1/60
        np.testing.assert_allclose(acc[seen] * 60, np.round(acc[seen] * 60), atol=1e-4)
        assert row["final"] == acc[:, -1].tolist()
        assert row["final_average"] == pytest.approx(acc[:, -1].mean())
        assert row["rare"] == acc[0, -1]  # the first task's classes, after the last task
        assert len(row["val"]) == 2 and all(0 <= a <= 1 for a in row["val"])
        assert row["wall_s"] == pytest.approx(row["fit_s"] + row["test_s"]) and row["fit_s"] > 0
    # same seed, model and data: the rows that train alike train the same weights
    np.testing.assert_array_equal(rows["mbpa_pixel"]["base"], rows["naive"]["test"])
    np.testing.assert_array_equal(rows["mbpa_hidden"]["base"], rows["replay"]["test"])
    np.testing.assert_array_equal(rows["mbpa_hidden_cb"]["base"], rows["replay_cb"]["test"])
    np.testing.assert_array_equal(rows["mbpa_recommended"]["base"], rows["replay_cb"]["test"])
    assert "logit_adjusted" in rows["mbpa_recommended"]["setting"]
    for name in ("naive", "replay", "replay_cb"):
        assert rows[name]["base"] is None and rows[name]["base_rare"] is None
    for name in ("mbpa_pixel", "mbpa_hidden", "mbpa_hidden_cb", "mbpa_recommended"):
        base = np.asarray(rows[name]["base"], dtype=float)[:, -1]
        assert rows[name]["base_rare"] == base[0]
        assert rows[name]["base_final_average"] == pytest.approx(base.mean())
    assert "class_balanced" in rows["replay_cb"]["setting"]
    assert "class_balanced" in rows["mbpa_hidden_cb"]["setting"]
    assert "class_balanced" not in rows["replay"]["setting"]
    # lambda is chosen on validation; lambda=0 trains exactly the naive weights
    search = result["ewc_search"]
    assert set(search) == {"0", "1000"}
    assert search["0"] == pytest.approx(rows["naive"]["val_average"])
    chosen = rows["ewc"]["extra"]["ewc_lambda"]
    assert search[f"{chosen:g}"] == max(search.values())
    assert "ewc_lambda" not in rows["naive"]["extra"]

    written = json.loads((tmp_path / "imbalanced_baselines.json").read_text())
    assert [row["label"] for row in written["rows"]] == [
        label for label, _ in baselines.ROWS.values()
    ]
    assert (tmp_path / "imbalanced_baselines.png").stat().st_size > 0
    report = baselines.report(result)
    for label, _ in baselines.ROWS.values():
        assert label in report
    assert "rare 0-4" in report and "MbPA, hidden keys minus each row" in report
    assert "MbPA, recommended recipe minus each row" in report
    assert "without adaptation (mbpa/base_acc)" in report
