"""``python -m pipeline.full`` (what ``./run.sh full`` runs): the steps it plans for one config, several
configs and an ensemble config (``ensemble.member_configs``), its refusals, and an ensemble config end to end
on the tiny competition."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import full
from pipeline.core.config import ConfigError
from pipeline.core.utils import read_json

from conftest import DEFAULT_CONFIG, config_overrides


def write_config(tmp_path: Path, name: str, **sections) -> str:
    """configs/default.yaml as experiment ``name`` with ``sections`` merged in (e.g. ensemble={...})."""
    values = yaml.safe_load(DEFAULT_CONFIG.read_text())
    values["experiment"] = name
    for key, section in sections.items():
        values[key] = {**values.get(key, {}), **section}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def steps_of(plan: list) -> list[tuple[str, str]]:
    return [(stage, cfg.experiment) for stage, cfg in plan]


def test_plans_one_config_several_and_an_ensemble_config(tmp_path):
    sets = config_overrides(tmp_path, tmp_path / "comp")
    a, b = write_config(tmp_path, "a"), write_config(tmp_path, "b")
    assert steps_of(full.plan([a], sets)) == [(stage, "a") for stage in full.STAGES]

    several = full.plan([a, b], sets)
    assert steps_of(several) == [("eda", "a")] + [(s, m) for m in "ab" for s in full.MEMBER_STAGES] + [
        (s, "a") for s in full.FINAL_STAGES]
    assert several[-1][1].ensemble.members == [str(tmp_path / "runs" / "b")]

    ens = write_config(tmp_path, "ens", ensemble={"member_configs": [a, b], "method": "hill_climb"})
    planned = full.plan([ens], sets)
    assert steps_of(planned) == [("eda", "ens")] + [(s, m) for m in "ab" for s in full.MEMBER_STAGES] + [
        ("preprocess", "ens")] + [(s, "ens") for s in full.FINAL_STAGES]
    final = planned[-1][1]
    assert final.ensemble.members == [str(tmp_path / "runs" / m) for m in "ab"]
    assert all(cfg.data.image_size == 16 for _, cfg in planned)  # the --set overrides reach every member


def test_refuses_shared_folders_other_data_nesting_and_extra_configs(tmp_path):
    sets = config_overrides(tmp_path, tmp_path / "comp")
    a, b = write_config(tmp_path, "a"), write_config(tmp_path, "b")
    with pytest.raises(ConfigError, match="share run folders"):
        full.plan([a, b], sets + ["experiment=same"])
    other = write_config(tmp_path, "other", data={"root": str(tmp_path / "elsewhere")})
    ens = write_config(tmp_path, "ens", ensemble={"member_configs": [a, other]})
    with pytest.raises(ConfigError, match="read different data"):
        full.plan([ens], config_overrides(tmp_path, None))
    nested = write_config(tmp_path, "nested", ensemble={"member_configs": [a, ens]})
    with pytest.raises(ConfigError, match="ensemble configs themselves"):
        full.plan([nested], sets)
    with pytest.raises(ConfigError, match="give it alone"):
        full.plan([ens, b], sets)


def test_a_failing_stage_stops_the_chain(tmp_path, capsys):
    sets = [a for text in config_overrides(tmp_path, tmp_path / "missing") for a in ("--set", text)]
    assert full.main([write_config(tmp_path, "a"), *sets]) == 1
    err = capsys.readouterr().err
    assert "== eda a" in err and "stage 'eda' failed" in err and "== preprocess" not in err


@pytest.mark.slow
def test_an_ensemble_config_trains_its_members_and_ensembles_them_in_its_own_folder(tmp_path, shared_competition,
                                                                                       capsys):
    a = write_config(tmp_path, "mem_a")
    b = write_config(tmp_path, "mem_b", train={"optimizer": "adamw", "lr": 0.01})
    ens = write_config(tmp_path, "ens", ensemble={"member_configs": [a, b], "method": "hill_climb"})
    sets = config_overrides(tmp_path, shared_competition, "folds.n_splits=2", "infer.tta=[identity]")
    assert full.main([ens, *[a for text in sets for a in ("--set", text)]]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("submission: ") and Path(last.split(": ", 1)[1]).name.startswith("ens-")
    runs = tmp_path / "runs"
    report = read_json(runs / "ens" / "ensemble.json")
    assert report["members"] == [str(runs / "mem_a"), str(runs / "mem_b")]  # the ensemble is not a member
    assert report["oof_scoring"] == "nested over folds" and set(report["oof_members"]) == {"mem_a", "mem_b"}
    assert not list((runs / "ens").glob("fold*"))  # nothing trained in the ensemble's own folder
    page = (tmp_path / "reports" / "ens" / "results" / "index.html").read_text()
    assert "mem_b" in page and "nested over folds" in page
    assert (tmp_path / "reports" / "ens" / "eda" / "index.html").is_file()


def test_the_shipped_ensemble_config_plans_its_members():
    planned = full.plan(["configs/ensemble/c10-tiny-ens.yaml"], [])
    members = {cfg.experiment for stage, cfg in planned if stage == "train"}
    assert members == {"c10-tiny", "c10-tiny-s7"} and planned[-1][1].experiment == "c10-tiny-ens"
