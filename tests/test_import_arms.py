"""ablations.study --import-arms: a fair study that adds arms (controls beside their parents) copies the shared
arms' trials from a finished study instead of training them again, only where every setting that decides a
trial is the same."""

from __future__ import annotations

import math

import pytest

from ablations import fair
from ablations.storage import open_storage, resolve_storage_url
from harness.errors import UserError

from test_fair import FAIR, ProtocolRun, fair_plan, run_all

OPTIMA = {"lora": math.log10(3e-3), "moslora": math.log10(3e-3), "moslora:freeze_middle=true": math.log10(1e-2)}
FIRST = {**FAIR, "final_seeds": 3}  # 3 pairs: the pooled SD needs 2 degrees of freedom
WITH_CONTROL = {**FIRST, "name": "tiny_controls",
                "space": [*FAIR["space"], {"method": "moslora", "freeze_middle": True}]}


class NoisyRun(ProtocolRun):
    """The protocol's fake run with a seed-by-method effect, so the paired differences have a spread."""

    def score(self, spec, lr, seed, split):
        return super().score(spec, lr, seed, split) + 0.01 * ((seed * 7 + len(spec)) % 5)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished fair study (lora, moslora) in a journal: run once for every test here."""
    root = tmp_path_factory.mktemp("source")
    (root / "first").mkdir()
    plan, storage, url = fair_plan(root / "first", data=FIRST, storage=f"journal:{root / 'first.log'}")
    run_all(plan, storage, NoisyRun(OPTIMA))
    return plan, storage, url


def _new(tmp_path, data=WITH_CONTROL, **options):
    from ablations.study import resolve_plan
    from ablations.studyfile import parse_study

    typed = {"model": "tiny-random", "max_steps": 2, "output_dir": str(tmp_path / "second" / "results"),
             "tracking_uri": f"sqlite:///{tmp_path / 'second.db'}", **options}
    plan = resolve_plan(parse_study(data, source="test", default_name=data["name"]), typed, None, None)
    url = resolve_storage_url(f"journal:{tmp_path / 'second.log'}")
    return plan, open_storage(url, create=True), url


def test_the_shared_arms_are_copied_and_only_the_new_arm_trains(tmp_path, source):
    from ablations.study import create_or_resume, import_arms

    first, source, source_url = source
    (tmp_path / "second").mkdir()
    plan, storage, url = _new(tmp_path)
    lines = []
    assert import_arms(plan, storage, url, source, source_url, log=lines.append) == ["lora", "moslora"]
    assert "imported the trials of lora, moslora from study 'tiny_fair'" in lines[0]
    plan = create_or_resume(plan, storage, url, log=lambda *a: None)
    fake = ProtocolRun(OPTIMA)
    run_all(plan, storage, fake)
    assert {spec for spec, *_ in fake.calls} == {"moslora:freeze_middle=true"}  # nothing shared ran again
    before = {a.spec: a for a in fair.method_results(first, source)}
    after = {a.spec: a for a in fair.method_results(plan, storage)}
    for spec in ("lora", "moslora"):
        assert after[spec].chosen_lr == before[spec].chosen_lr and after[spec].test == before[spec].test
    control = after["moslora:freeze_middle=true"]
    assert control.reference == "moslora" and sorted(control.test) == sorted(before["moslora"].test)
    rows = {r["method"]: r for r in fair.verdict_rows(plan, list(after.values()))}
    assert rows["moslora:freeze_middle=true"]["family"] == fair.CONTROL_FAMILY
    # a resumed command with the flag again changes nothing and says so
    lines = []
    assert import_arms(plan, storage, url, source, source_url, log=lines.append) == []
    assert "--import-arms ignored" in lines[0]


@pytest.mark.parametrize("options, data, message", [
    ({"max_steps": 3}, WITH_CONTROL, "--max-steps (2 there, 3 here)"),
    ({}, {**WITH_CONTROL, "final_seeds": 4}, "final_seeds"),
    ({}, {**WITH_CONTROL, "space": [{"method": "lora", "r": 4}, {"method": "moslora", "r": 4}]}, "shares no method"),
])
def test_an_import_from_a_study_run_otherwise_is_refused_in_one_line(tmp_path, source, options, data, message):
    from ablations.study import import_arms

    _, source, source_url = source
    (tmp_path / "second").mkdir()
    plan, storage, url = _new(tmp_path, data=data, **options)
    with pytest.raises(UserError, match="--import-arms: ") as err:
        import_arms(plan, storage, url, source, source_url)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_plan_counts_only_the_arms_it_would_train_and_takes_the_sd_from_the_imported_study(tmp_path, source):
    from ablations.study import design_text

    first, storage, url = source
    (tmp_path / "second").mkdir()
    plan, _, new_url = _new(tmp_path)
    text = design_text(plan, new_url, (storage, url))
    assert "imported from study 'tiny_fair' (not run again): lora, moslora" in text
    # one arm left to train: 3 rates x 1 tuning seed (up to 5 with one extension a side) + 3 final seeds
    assert "trials: 3 tuning (1 method(s) x 3 rates x 1 tuning seed(s); up to 5 if every extension is needed) " \
           "+ 3 final (3 fresh seeds per method) = 6 to 8" in text
    assert "pooled over tiny_fair's final runs" in text and "ASSUMED" not in text


def test_a_study_whose_first_arm_is_new_is_created_around_the_imported_ones(tmp_path, source):
    from ablations.study import create_or_resume, import_arms

    first, storage_source, source_url = source
    (tmp_path / "second").mkdir()
    control_first = {**WITH_CONTROL, "space": [WITH_CONTROL["space"][-1], *WITH_CONTROL["space"][:-1]]}
    plan, storage, url = _new(tmp_path, data=control_first)
    assert plan.specs()[0] == "moslora:freeze_middle=true"
    assert import_arms(plan, storage, url, storage_source, source_url, log=lambda *a: None) == ["lora", "moslora"]
    lines = []
    plan = create_or_resume(plan, storage, url, imported=True, log=lines.append)
    from ablations.report import trials_frame

    queued = trials_frame(plan, storage)
    queued = queued[queued["state"] == "WAITING"]
    assert sorted(queued["lr"]) == sorted(plan.lr_grid)  # trials.csv shows the rate each was queued with
    assert any("created in" in line and "around the imported arms" in line for line in lines)
    assert not any("another machine" in line for line in lines)
    fake = ProtocolRun(OPTIMA)
    run_all(plan, storage, fake)
    assert {spec for spec, *_ in fake.calls} == {"moslora:freeze_middle=true"}
    assert sorted(next(a for a in fair.method_results(plan, storage) if a.reference == "moslora").test) == [1, 2, 3]


def test_a_tuning_only_import_reruns_the_shared_arms_final_seeds_at_the_copied_choice(tmp_path, source):
    """--import-tuning-only: the shared arms are not tuned again, their final seeds run again at the imported
    rate (the same seed and rate give the same score), and --plan counts those finals as trials to run."""
    from ablations.study import create_or_resume, design_text, import_arms

    first, source_storage, source_url = source
    (tmp_path / "second").mkdir()
    plan, storage, url = _new(tmp_path)
    text = design_text(plan, url, (source_storage, source_url), tuning_only=True)
    # the control's 3 tuning rates, and 3 final seeds for each of the 3 arms
    assert "trials: 3 tuning (1 method(s) x 3 rates x 1 tuning seed(s); up to 5 if every extension is needed) " \
           "+ 9 final (3 fresh seeds per method) = 12 to 14" in text
    assert "the tuning trials of lora, moslora, whose final seeds run again" in text
    # a study that imports every arm's tuning runs only finals: 0 methods tuned, not "all of them"
    every = {**FIRST, "name": "tiny_rerun"}
    (tmp_path / "rerun" / "second").mkdir(parents=True)
    rerun, _, rerun_url = _new(tmp_path / "rerun", data=every)
    assert "trials: 0 tuning (0 method(s) x 3 rates" in design_text(rerun, rerun_url, (source_storage, source_url),
                                                                      tuning_only=True)
    lines = []
    assert import_arms(plan, storage, url, source_storage, source_url, log=lines.append,
                       tuning_only=True) == ["lora", "moslora"]
    assert "imported the tuning trials of lora, moslora" in lines[0] and "final seeds run again" in lines[0]
    plan = create_or_resume(plan, storage, url, imported=True, log=lambda *a: None)
    fake = NoisyRun(OPTIMA)
    run_all(plan, storage, fake)
    before = {a.spec: a for a in fair.method_results(first, source_storage)}
    after = {a.spec: a for a in fair.method_results(plan, storage)}
    for spec in ("lora", "moslora"):
        ran = [(seed, split) for s, seed, _, split in fake.calls if s == spec]
        assert sorted(ran) == [(1, "test"), (2, "test"), (3, "test")]  # finals only: no tuning trial ran again
        assert all(math.isclose(lr, before[spec].chosen_lr) for s, _, lr, _ in fake.calls if s == spec)
        assert after[spec].chosen_lr == before[spec].chosen_lr and after[spec].test == before[spec].test
    assert {s for s, _, _, split in fake.calls if split == "validation"} == {"moslora:freeze_middle=true"}


def test_import_tuning_only_without_import_arms_is_one_line(tmp_path, capsys):
    from ablations.study import main

    assert main(["fair", "--import-tuning-only", "--storage", f"journal:{tmp_path / 'x.log'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--import-tuning-only: " in err and "--import-arms URL" in err
    assert not (tmp_path / "x.log").exists()  # nothing was created


def test_a_tuning_only_import_from_a_study_that_has_not_chosen_a_rate_is_refused(tmp_path):
    """Its finals would otherwise wait for a tuning this study redoes, and could choose another rate."""
    from ablations.study import import_arms

    (tmp_path / "first").mkdir()
    unfinished, _, unfinished_url = fair_plan(tmp_path / "first", data=FIRST, storage=f"journal:{tmp_path / 'u.log'}")
    source_storage = open_storage(unfinished_url, create=False)  # created, its tuning queued, nothing run
    (tmp_path / "second").mkdir()
    plan, storage, url = _new(tmp_path)
    with pytest.raises(UserError) as err:
        import_arms(plan, storage, url, source_storage, unfinished_url, tuning_only=True)
    assert str(err.value).startswith("--import-tuning-only: study 'tiny_fair' has not chosen a rate for lora, moslora")
    assert "\n" not in str(err.value)
    lines = []  # a full import of the same study is what it always was: the unfinished arms come along
    assert import_arms(plan, storage, url, source_storage, unfinished_url, log=lines.append) == ["lora", "moslora"]
