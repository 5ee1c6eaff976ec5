"""The Findings text in results/README.md: every figure in it is recomputed from the shipped study files."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps

from ablations import findings

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "results" / "findings" / "fair-paper"
README = ROOT / "results" / "README.md"
SHIPPED = ("study.yaml", "verdict.csv", "items.csv.gz", "trials.csv", "journal.log", "result.json", "diagnostics.csv")


@pytest.fixture
def copy(tmp_path):
    """The shipped study folder and README, copied: the tests never touch the repository's files."""
    folder = tmp_path / "fair-paper"
    folder.mkdir()
    for name in SHIPPED:
        shutil.copy(STUDY / name, folder / name)
    readme = tmp_path / "README.md"
    shutil.copy(README, readme)
    return folder, readme


def test_the_readme_findings_block_is_what_the_shipped_files_give(copy, capsys):
    folder, readme = copy
    assert findings.main([str(folder), "--readme", str(readme), "--check"]) == 0, capsys.readouterr().err
    assert readme.read_text() == README.read_text()  # --check changes nothing


def test_every_findings_block_in_the_readme_is_what_its_folder_gives(capsys):
    blocks = re.findall(r"<!-- findings:([\w-]+) begin", README.read_text())
    assert "fair-paper" in blocks and "brief" in blocks
    for study in blocks:
        if study == "brief":  # the summary across studies: its own test below
            continue
        assert findings.main([str(ROOT / "results" / "findings" / study), "--readme", str(README), "--check"]) == 0, \
            (study, capsys.readouterr().err)


def test_a_study_with_controls_compares_each_with_its_parent_in_the_text():
    folder = ROOT / "results" / "findings" / "fair-controls"
    text = findings.text(folder)
    verdict = pd.read_csv(folder / "verdict.csv", keep_default_na=False)
    for row in verdict.itertuples():
        if row.family == "vs control":
            line = next(line for line in text.splitlines() if line.startswith(f"| {findings.name(row.method)} |"))
            assert line.split(" | ")[1] == findings.name(row.reference)  # the vs column names its parent
    assert "**What the controls show**" in text and "**The ordering" not in text


def block_of(readme: Path) -> str:
    text = readme.read_text()
    return text[text.index("<!-- findings:fair-paper begin"):text.index("<!-- findings:fair-paper end -->")]


def test_the_gains_in_the_readme_match_a_t_interval_computed_here_from_the_items(copy):
    folder, readme = copy
    items = pd.read_csv(folder / "items.csv.gz")
    per_task = items.groupby(["method", "seed", "task"])["correct"].mean()
    score = per_task.groupby(["method", "seed"]).mean()  # a seed's score: the mean over tasks of task accuracy
    lora = score["lora"]
    block = block_of(readme)
    for method, label in (("moslora", "MoSLoRA"), ("linchain", "LinChain-3")):
        if method not in score.index.get_level_values(0):
            continue
        mine = score[method]
        seeds = sorted(set(mine.index) & set(lora.index))
        d = 100 * np.array([mine[s] - lora[s] for s in seeds])
        half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        expected = f"{d.mean():+.1f} [{d.mean() - half:+.1f}, {d.mean() + half:+.1f}]"
        row = next(line for line in block.splitlines() if line.startswith(f"| {label} |"))
        assert expected in row, (expected, row)
        test = f"{100 * mine.mean():.1f} ± {100 * mine.std(ddof=1):.1f}% ({len(mine)} seeds)"
        assert test in row


def test_a_changed_item_makes_the_check_fail_and_rewriting_fixes_it(copy, capsys):
    folder, readme = copy
    # change one final run's items: verdict.csv no longer agrees, so the text cannot be written from the files
    items = pd.read_csv(folder / "items.csv.gz")
    items.loc[items.index[:40], "correct"] = 1.0 - items.loc[items.index[:40], "correct"]
    items.to_csv(folder / "items.csv.gz", index=False)
    assert findings.main([str(folder), "--readme", str(readme), "--check"]) == 2
    assert "differs from items.csv.gz" in capsys.readouterr().err
    # an edited figure in the README is found
    shutil.copy(STUDY / "items.csv.gz", folder / "items.csv.gz")
    text = readme.read_text()
    block = block_of(readme)
    edited = re.sub(r"(\d+\.\d) ± ", lambda m: f"{float(m.group(1)) + 1:.1f} ± ", block, count=1)
    assert edited != block
    readme.write_text(text.replace(block, edited))
    assert findings.main([str(folder), "--readme", str(readme), "--check"]) == 1
    assert findings.main([str(folder), "--readme", str(readme)]) == 0
    assert readme.read_text() == README.read_text()


def test_bad_input_is_one_line(tmp_path, copy, capsys):
    folder, readme = copy
    assert findings.main([str(tmp_path / "nowhere")]) == 2
    assert "study.yaml not found" in capsys.readouterr().err
    assert findings.main([str(folder), "--check"]) == 2
    assert "--check needs --readme" in capsys.readouterr().err
    bare = tmp_path / "bare.md"
    bare.write_text("# no markers\n")
    assert findings.main([str(folder), "--readme", str(bare)]) == 2
    assert "has no block for 'fair-paper'" in capsys.readouterr().err


def test_the_ordering_verdict_follows_every_pair_and_holm():
    up = {s: 0.5 + 0.01 * s for s in range(1, 9)}
    scores = {"lora": {s: 0.40 + 0.002 * (s % 3) for s in up},
              "moslora": {s: 0.50 + 0.002 * (s % 2) for s in up},
              "linchain": {s: 0.60 + 0.001 * (s % 4) for s in up}}
    rows = findings.ordering(scores)
    assert [(hi, lo) for hi, lo, _, _ in rows] == [("moslora", "lora"), ("linchain", "lora"), ("linchain", "moslora")]
    assert findings.ordering_verdict(rows, []).startswith("supported")
    # p-values: Holm over 3 pairs, each at least the raw p
    assert all(p >= c.p_value for _, _, c, p in rows)
    swapped = {**scores, "linchain": scores["lora"], "lora": scores["linchain"]}
    assert findings.ordering_verdict(findings.ordering(swapped), []).startswith("not supported at this scale: LoRA above")
    noisy = {m: {s: 0.5 + 0.05 * ((s * (i + 3)) % 5) for s in up} for i, m in enumerate(scores)}
    assert "inconclusive" in findings.ordering_verdict(findings.ordering(noisy), ["linchain"])


def test_the_rate_is_chosen_again_from_trials_csv_by_the_studys_rule(tmp_path):
    rows = [("lora", lr, acc) for lr, acc in ((1e-3, 0.50), (1.78e-3, 0.62), (3.16e-3, 0.60), (5.62e-3, 0.2))]
    rows += [("moslora", lr, acc) for lr, acc in ((1e-3, 0.55), (1.78e-3, 0.50), (3.16e-3, 0.30))]
    frame = pd.DataFrame([{"spec": s, "lr": lr, "average_accuracy": a, "stage": "tune", "state": "COMPLETE"}
                          for s, lr, a in rows]
                         + [{"spec": "lora", "lr": 9e-3, "average_accuracy": 0.99, "stage": "tune", "state": "FAIL"},
                            {"spec": "lora", "lr": 1.78e-3, "average_accuracy": 0.99, "stage": "final",
                             "state": "COMPLETE"}])
    frame.to_csv(tmp_path / "trials.csv", index=False)
    tuned = findings.tuning(tmp_path, 0.5)
    assert tuned["lora"].chosen == 1.78e-3 and not tuned["lora"].at_edge  # neither the failed nor the test row counts
    assert tuned["moslora"].chosen == 1e-3 and tuned["moslora"].at_edge


BRIEF_FOLDERS = re.compile(r"<!-- findings:brief begin: written by `python -m ablations.findings --brief ([^`]+?) --readme")


def brief_folders() -> list[Path]:
    return [ROOT / f for f in BRIEF_FOLDERS.search(README.read_text()).group(1).split()]


def test_the_readme_brief_is_what_the_studies_named_in_its_marker_give(capsys):
    folders = brief_folders()
    assert [f.name for f in folders][:1] == ["fair-paper"] and all(f.is_dir() for f in folders)
    argv = ["--brief", *map(str, folders), "--readme", str(README), "--check"]
    assert findings.main(argv) == 0, capsys.readouterr().err


def brief_rows() -> dict[str, list[str]]:
    """The brief's table as {claim: cells}, split on the unescaped pipes only."""
    text = README.read_text()
    block = text[text.index("<!-- findings:brief begin"):text.index("<!-- findings:brief end -->")]
    rows = {}
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| claim |"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0]] = cells
    return rows


def test_the_brief_table_has_four_cells_a_row_even_where_a_measure_holds_pipes():
    rows = brief_rows()
    assert rows and all(len(cells) == 4 for cells in rows.values()), rows
    paths = next(cells for claim, cells in rows.items() if "optimization paths" in claim)
    assert "\\|\\|dW" in paths[1]  # the norm bars are escaped, not read as cell borders


def test_the_briefs_gains_over_lora_are_t_intervals_recomputed_here_each_pair_once():
    rows = brief_rows()
    beats = rows["a method beats LoRA"]
    expected_methods = []
    for folder in brief_folders():
        items = pd.read_csv(folder / "items.csv.gz")
        score = items.groupby(["method", "seed", "task"])["correct"].mean().groupby(["method", "seed"]).mean()
        verdict = pd.read_csv(folder / "verdict.csv", keep_default_na=False)
        for row in verdict.itertuples():
            if row.family != "vs LoRA" or row.method in expected_methods:
                continue
            expected_methods.append(row.method)
            if row.method not in score.index.get_level_values(0):
                assert f"{findings.name(row.method)} not measured yet" in beats[3]
                continue
            mine, lora = score[row.method], score["lora"]
            seeds = sorted(set(mine.index) & set(lora.index))
            d = 100 * np.array([mine[s] - lora[s] for s in seeds])
            half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
            expected = f"{findings.name(row.method)} {d.mean():+.1f} [{d.mean() - half:+.1f}, {d.mean() + half:+.1f}]"
            assert expected in beats[3], (expected, beats[3])
    # an arm imported into a later study (LoRA's comparisons with MoSLoRA, LinChain-3) is listed once
    listed = [part.split(" ")[0] for part in beats[3].split("; ")]
    assert len(listed) == len(set(listed)) == len(expected_methods)


def test_tally_groups_methods_by_verdict():
    assert findings.tally([("moslora", "inconclusive"), ("linchain", "inconclusive")]) == "**inconclusive** for all 2"
    assert findings.tally([("moslora", "opposite")]) == "**opposite** for MoSLoRA"
    assert findings.tally([("moslora", "opposite"), ("condlora", "not measured"), ("linchain", "opposite")]) == \
        "**opposite**: MoSLoRA, LinChain-3; **not measured**: `condlora`"
    assert findings.tally([]) == "not measured yet"


def test_several_folders_need_brief_and_a_missing_brief_block_is_one_line(copy, tmp_path, capsys):
    folder, readme = copy
    assert findings.main([str(folder), str(folder)]) == 2
    assert "several need --brief" in capsys.readouterr().err
    bare = tmp_path / "bare.md"
    bare.write_text("# no markers\n")
    assert findings.main(["--brief", str(folder), "--readme", str(bare)]) == 2
    assert "has no block for 'brief'" in capsys.readouterr().err


def test_the_top_readmes_abridged_table_is_fair_papers_verdict():
    """The table under "What an answer looks like" in the top README is typed, so it is checked: every figure in it
    is fair-paper's verdict.csv, rounded as verdict.md rounds it."""
    top = (ROOT / "README.md").read_text()
    verdict = pd.read_csv(STUDY / "verdict.csv", keep_default_na=False, na_values=[""]).set_index("method")
    rows = {line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[2:-1]]
            for line in top[top.index("What an answer looks like"):top.index("Where to go next")].splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(verdict.index), rows
    for method, (lr, test, gain, p, word) in rows.items():
        row = verdict.loc[method]
        assert lr == f"{row.chosen_lr:.3g}"
        assert test == f"{100 * row.test_mean:.1f} ± {100 * row.test_std:.1f}"
        if method == "lora":
            assert word == "reference"
            continue
        assert gain == f"{100 * row.gain:+.1f} [{100 * row.gain_low:+.1f}, {100 * row.gain_high:+.1f}]"
        assert p == f"{row.p_holm:.3g}" and word == row.verdict


def test_every_interval_typed_in_a_fair_studys_readme_is_one_the_generated_files_hold():
    """A study folder's README is written by hand around its generated files; a gain typed there with its interval
    must be one that verdict.md, diagnostics.md, retune.md or the generated Findings blocks print, verbatim."""
    interval = re.compile(r"[+-]?\d+(?:\.\d+)? \[[+-]?\d+(?:\.\d+)?, [+-]?\d+(?:\.\d+)?\]")
    findings_dir = ROOT / "results" / "findings"
    generated = README.read_text() + "".join(p.read_text() for p in findings_dir.glob("fair-*/*.md")
                                             if p.name != "README.md")
    typed = {p.parent.name: interval.findall(p.read_text()) for p in findings_dir.glob("fair-*/README.md")}
    assert sum(map(len, typed.values())) >= 5  # the pattern finds the intervals the READMEs do quote
    stale = {study: [i for i in found if i not in generated] for study, found in typed.items()}
    assert not any(stale.values()), stale


def test_the_brief_names_every_withheld_score_verdict_as_withheld():
    rows = brief_rows()
    verdicts = " ".join(rows["a method beats LoRA"][2:3] + rows.get("what the controls show", ["", "", ""])[2:3])
    held = [row.method for folder in brief_folders()
            for row in pd.read_csv(folder / "verdict.csv", keep_default_na=False).itertuples()
            if "withheld:" in row.note]
    assert held  # the shipped studies do hold withheld comparisons (condlora, lora:match=linchain)
    withheld_part = " ".join(part.split("**")[0] for part in verdicts.split("**withheld (a rate at the grid's edge)**:")[1:])
    for method in held:
        assert findings.name(method) in withheld_part, (method, verdicts)


def _diagnostics(folder: Path, losses: dict[str, dict[int, float]]) -> Path:
    folder.mkdir(exist_ok=True)
    pd.DataFrame([{"method": m, "seed": seed, "first_loss": v} for m, by in losses.items() for seed, v in by.items()]
                 ).to_csv(folder / "diagnostics.csv", index=False)
    return folder


def test_arms_whose_base_forward_differs_fall_in_kernel_groups(tmp_path):
    """The first step's loss is the base model's loss on the seed's first batch: arms computed alike agree at every
    seed (to the 6 stored digits), arms computed on another CPU differ at every seed by far more."""
    alike = {1: 0.766461, 2: 1.38258, 3: 1.21432}
    other = {1: 0.776233, 2: 1.38908, 3: 1.21508}
    folder = _diagnostics(tmp_path / "one", {"lora": alike, "moslora": dict(alike), "linchain": {1: 0.766461}})
    check = findings.kernel_groups(folder)
    assert [sorted(g) for g in check.groups] == [["linchain", "lora", "moslora"]] and check.unchecked == []
    assert "is the same in every arm checked at each seed" in findings.kernels_text(check)
    folder = _diagnostics(tmp_path / "two", {"lora": alike, "mtlora:structure=shim": other, "condlora": dict(other),
                                             "moslora": dict(alike)})
    check = findings.kernel_groups(folder)
    assert [list(g) for g in check.groups] == [["lora", "moslora"], ["mtlora:structure=shim", "condlora"]]
    text = findings.kernels_text(check)
    assert "differs between the arms {LoRA, MoSLoRA} and {`mtlora:structure=shim`, `condlora`}" in text
    assert "(seed 1: 0.766461 against 0.776233)" in text and "ablations.repeat" in text
    # one seed that disagrees is enough: the arm was not computed alike
    folder = _diagnostics(tmp_path / "three", {"lora": alike, "moslora": {**alike, 3: 1.21508}})
    assert len(findings.kernel_groups(folder).groups) == 2
    # an arm that shares no seed with the others, and one whose first loss is not the base model's (PiSSA moves W0,
    # DoRA recomputes the weight), are not checked: neither is evidence of other kernels
    folder = _diagnostics(tmp_path / "four", {"lora": alike, "moslora": {7: 0.5}, "pissa": other, "dora": other})
    check = findings.kernel_groups(folder)
    assert [list(g) for g in check.groups] == [["lora"]] and sorted(check.unchecked) == ["dora", "moslora", "pissa"]
    assert "Not checked: `pissa`, `dora`, MoSLoRA (" in findings.kernels_text(check)
    assert not findings.starts_at_base("moslora:bias=true") and findings.starts_at_base("linchain:init=orthogonal")
    # runs that predate the measurement say nothing
    (tmp_path / "old").mkdir()
    pd.DataFrame([{"method": "lora", "seed": 1}]).to_csv(tmp_path / "old" / "diagnostics.csv", index=False)
    assert findings.kernel_groups(tmp_path / "old").groups == [] and findings.kernels_text(
        findings.kernel_groups(tmp_path / "old")) == ""


def test_a_rerun_study_adds_a_row_on_whether_the_verdicts_hold(tmp_path):
    """A study that reran another's final runs holds repeat.csv (ablations.repeat), which names the original: the brief
    gets one row with how many runs repeated and each gain beside the original's."""
    from ablations import repeat

    folders = {}
    for label in ("orig", "rerun"):
        folder = tmp_path / label
        folder.mkdir()
        for name in SHIPPED:
            shutil.copy(STUDY / name, folder / name)
        design = yaml.safe_load((folder / "study.yaml").read_text())
        (folder / "study.yaml").write_text(yaml.safe_dump({**design, "name": label}))
        folders[label] = folder
    assert repeat.main([str(folders["orig"]), str(folders["rerun"])]) == 0
    runs = pd.read_csv(folders["rerun"] / "repeat.csv")
    studies = [findings.read_study(folders["orig"]), findings.read_study(folders["rerun"])]
    (row,) = findings.replication_rows(studies)
    assert row[0] == "the verdicts hold on new runs (`rerun` reran `orig`)"
    assert row[2].startswith("**the same verdicts**: MoSLoRA inconclusive")
    assert row[3].startswith(f"{len(runs)} of {len(runs)} runs repeated item for item (0 of "
                             f"{runs['compared_items'].sum()} items differ)")
    verdict = pd.read_csv(STUDY / "verdict.csv").set_index("method")
    gain = verdict.loc["moslora"]
    shown = f"{100 * gain.gain:+.1f} [{100 * gain.gain_low:+.1f}, {100 * gain.gain_high:+.1f}]"
    assert f"MoSLoRA {shown} (was {shown})" in row[3]
    with pytest.raises(findings.UserError, match="names orig original study"):
        findings.replication_rows(studies[1:])


def test_each_shipped_runs_first_loss_is_the_journals_first_step():
    """diagnostics.csv's first_loss is read back from the loss curve each final trial stored in the journal."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from ablations.storage import DIAGNOSTICS_ATTR

    for folder in brief_folders():
        runs = pd.read_csv(folder / "diagnostics.csv")
        if "first_loss" not in runs.columns:
            continue
        storage = JournalStorage(JournalFileBackend(str(folder / "journal.log")))
        stored = {}
        for summary in optuna.get_all_study_summaries(storage):
            if not summary.study_name.endswith("/final"):
                continue
            for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials:
                packed = t.user_attrs.get(DIAGNOSTICS_ATTR)
                if t.state.name == "COMPLETE" and packed:
                    steps = {int(step): value for step, value in packed["trace"]["losses"]}
                    stored[(t.user_attrs["spec"], int(t.user_attrs["seed"]))] = steps[1]
        checked = 0
        for r in runs.itertuples():
            if (r.method, int(r.seed)) in stored:
                assert r.first_loss == pytest.approx(stored[(r.method, int(r.seed))], rel=1e-12)
                checked += 1
        assert checked >= 8, folder
