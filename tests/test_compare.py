"""pipeline.compare: OOF tables scored row by row, seeds averaged, the paired interval and McNemar's test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import compare
from pipeline.core.utils import read_json

CLASSES = ["ant", "bee", "cat"]
N = 600


def write_oof(path: Path, right: np.ndarray, labels: np.ndarray | None = None, skip: int = 0) -> Path:
    """An OOF table whose arg-max is the label exactly on ``right``; the first ``skip`` rows left unpredicted."""
    labels = np.arange(N) % 3 if labels is None else labels
    guess = np.where(right, labels, (labels + 1) % 3)
    probs = np.full((N, 3), 0.1)
    probs[np.arange(N), guess] = 0.8
    probs[:skip] = np.nan
    table = pd.DataFrame(probs, columns=CLASSES)
    table.insert(0, "fold", np.arange(N) % 5)
    table.insert(0, "label", np.array(CLASSES)[labels])
    table.insert(0, "id", [f"{i:05d}" for i in range(N)])
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def test_a_real_gain_is_told_from_noise(tmp_path):
    base = np.arange(N) < 420                      # 0.70
    better = base | (np.arange(N) >= 540)          # 0.80: 60 more rows right, none lost
    shuffled = np.roll(base, 7)                    # 0.70 again, on other rows
    a = write_oof(tmp_path / "a" / "oof.csv", base).parent
    b = write_oof(tmp_path / "b" / "oof.csv", better).parent
    c = write_oof(tmp_path / "c" / "oof.csv", shuffled).parent
    report = compare.compare([[str(a)], [str(b)], [str(c)]], n_boot=2000)
    first, gain, same = report["models"]
    assert report["rows"] == N and first["accuracy"] == pytest.approx(0.7) and gain["accuracy"] == pytest.approx(0.8)
    assert first["ci95"][0] < 0.7 < first["ci95"][1]
    assert gain["vs_first"]["difference"] == pytest.approx(0.1) and gain["vs_first"]["ci95"][0] > 0.05
    assert (gain["vs_first"]["only_this_right"], gain["vs_first"]["only_first_right"]) == (60, 0)
    assert gain["vs_first"]["mcnemar_p"] < 1e-10
    assert same["vs_first"]["difference"] == pytest.approx(0.0)
    assert same["vs_first"]["ci95"][0] < 0 < same["vs_first"]["ci95"][1] and same["vs_first"]["mcnemar_p"] == 1.0


def test_seeds_are_averaged_row_by_row_and_tta_preferred(tmp_path):
    everything, nothing = np.ones(N, bool), np.zeros(N, bool)
    write_oof(tmp_path / "s1" / "oof.csv", nothing)
    write_oof(tmp_path / "s1" / "oof_tta.csv", everything)  # the TTA table wins unless --plain
    write_oof(tmp_path / "s2" / "oof.csv", nothing)
    ref = write_oof(tmp_path / "ref" / "oof.csv", np.arange(N) % 2 == 0).parent
    seeds = [str(tmp_path / "s1"), str(tmp_path / "s2")]
    report = compare.compare([[str(ref)], seeds], n_boot=500)
    assert report["models"][1]["accuracy"] == pytest.approx(0.5) and report["models"][1]["runs"] == 2
    assert "mcnemar_p" not in report["models"][1]["vs_first"]  # a mean of seeds is no single run's table
    assert compare.compare([[str(ref)], seeds], plain=True, n_boot=500)["models"][1]["accuracy"] == 0.0

    out = tmp_path / "report.json"
    assert compare.main([str(ref), ",".join(seeds), "--plain", "--bootstrap", "300", "--out", str(out)]) == 0
    assert read_json(out)["models"][1]["vs_first"]["difference"] == pytest.approx(-0.5)


def test_only_rows_every_model_predicted_are_compared(tmp_path):
    a = write_oof(tmp_path / "a.csv", np.ones(N, bool), skip=100)   # folds not trained: NaN rows
    b = write_oof(tmp_path / "b.csv", np.arange(N) >= 100)
    report = compare.compare([[str(a)], [str(b)]], n_boot=300)
    assert report["rows"] == N - 100 and report["models"][1]["accuracy"] == 1.0


def test_other_rows_or_labels_are_refused_naming_the_runs(tmp_path):
    a = write_oof(tmp_path / "a.csv", np.ones(N, bool))
    relabelled = write_oof(tmp_path / "b.csv", np.ones(N, bool), labels=(np.arange(N) + 1) % 3)
    with pytest.raises(ValueError, match="b.csv labels rows differently"):
        compare.compare([[str(a)], [str(relabelled)]])
    with pytest.raises(ValueError, match="b.csv and .*a.csv hold other rows or labels"):
        compare.compare([[str(a), str(relabelled)]])
    with pytest.raises(FileNotFoundError, match="no oof_tta.csv or oof.csv"):
        compare.compare([[str(a)], [str(tmp_path)]])


@pytest.mark.parametrize("metric", ["macro_f1", "log_loss"])
def test_other_metrics_are_scikit_learns(tmp_path, metric):
    """macro-F1 and log loss from the resample weights equal scikit-learn's on the plain rows; the difference of a
    model with itself is exactly zero on every resample."""
    from sklearn.metrics import f1_score, log_loss

    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), N)
    labels = rng.integers(0, 3, N)
    labels[:5] = 0  # every class present
    table = pd.DataFrame(probs, columns=CLASSES).assign(id=[f"{i:05d}" for i in range(N)],
                                                        label=np.array(CLASSES)[labels], fold=0)
    path = tmp_path / "oof.csv"
    table.to_csv(path, index=False)
    report = compare.compare([[str(path)], [str(path)]], n_boot=400, metric=metric)
    want = (f1_score(labels, probs.argmax(1), average="macro") if metric == "macro_f1"
            else log_loss(labels, probs, labels=[0, 1, 2]))
    first, same = report["models"]
    assert first[metric] == pytest.approx(want, abs=1e-5) and first["ci95"][0] < want < first["ci95"][1]
    assert same["vs_first"] == {"difference": 0.0, "ci95": (0.0, 0.0)}
    with pytest.raises(ValueError, match="not one of"):
        compare.compare([[str(path)]], metric="auc")
