"""The Findings text in results/README.md: every figure in it is recomputed from the shipped study files."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ablations import findings

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "results" / "findings" / "fair-paper"
README = ROOT / "results" / "README.md"
SHIPPED = ("study.yaml", "verdict.csv", "items.csv.gz", "trials.csv", "journal.log", "result.json")


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
    assert "fair-paper" in blocks
    for study in blocks:
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
