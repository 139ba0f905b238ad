"""The data contract finds the id and label columns when they are unambiguous, and names the candidates when not."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DataConfig
from pipeline.data.contract import DataError, group_candidates, load_competition
from pipeline.eda.suggest import group_columns

from conftest import make_competition


def rewrite(root, train: dict, sample: dict) -> None:
    """Rename (and add) columns of train.csv and sample_submission.csv: ``{new: old column or a list of values}``."""
    for name, spec in (("train.csv", train), ("sample_submission.csv", sample)):
        frame = pd.read_csv(root / name, dtype=str)
        pd.DataFrame({new: frame[old] if isinstance(old, str) else old for new, old in spec.items()}).to_csv(
            root / name, index=False)


def test_an_id_column_named_otherwise_is_the_one_naming_the_files(tmp_path):
    root = make_competition(tmp_path / "comp", groups=True)
    rewrite(root, {"image": "id", "patient": "patient", "label": "label"}, {"image": "id", "label": "label"})
    comp = load_competition(DataConfig(root=str(root)))
    assert (comp.id_col, comp.label_col) == ("image", "label") and comp.problems == []
    assert comp.train["path"].notna().all() and comp.test["path"].notna().all()


def test_a_label_column_named_otherwise_is_the_one_with_few_values(tmp_path):
    root = make_competition(tmp_path / "comp")
    score = np.linspace(0, 1, 36).round(4).astype(str)  # one value a row: not a class column
    rewrite(root, {"id": "id", "breed": "label", "score": list(score)}, {"id": "id", "breed": "label"})
    comp = load_competition(DataConfig(root=str(root)))
    assert comp.label_col == "breed" and sorted(comp.classes) == ["blob", "hstripes", "vstripes"]


@pytest.mark.parametrize("train, key, names", [
    ({"image": "id", "copy": "id", "label": "label"}, "data.id_col", "(image, copy)"),
    ({"id": "id", "breed": "label", "colour": "label"}, "data.label_col", "(breed, colour)"),
    ({"image": "label", "label": "label"}, "data.id_col", "no column whose values name the files"),
])
def test_an_ambiguous_or_missing_column_is_an_error_naming_the_candidates(tmp_path, train, key, names):
    root = make_competition(tmp_path / "comp")
    rewrite(root, train, {"id": "id", "label": "label"})
    with pytest.raises(DataError, match=rf"{key}=COLUMN") as err:
        load_competition(DataConfig(root=str(root)))
    assert len(err.value.problems) == 1 and names in err.value.problems[0]


def test_a_column_with_several_rows_per_value_is_suggested_as_the_group(tmp_path):
    root = make_competition(tmp_path / "comp", groups=True)  # two images per patient
    comp = load_competition(DataConfig(root=str(root)))
    (found,) = group_candidates(comp, n_splits=5)
    assert found == {"column": "patient", "values": 18, "rows_per_value": 2.0}
    (advice,) = group_columns([found])
    assert advice["set"] == ["data.group_col=patient"] and advice["topic"] == "cross-validation"
    assert group_candidates(load_competition(DataConfig(root=str(make_competition(tmp_path / "plain")))), 5) == []
