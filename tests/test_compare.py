"""Protocol fingerprints, result.json and python -m harness.compare across separately launched runs."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness import compare as hcompare
from harness.config import config_from_args
from harness.errors import UserError
from harness.fingerprint import differing_parts, protocol_fingerprint, short_hash, weights_checksum
from harness.report import SystemResult
from harness.resultfile import build_result, load_result_json, systems_of, write_result_json

SMOKE = ["--model", "tiny-random", "--max-steps", "2", "--limit", "4", "--batch-size", "4",
         "--eval-batch-size", "8", "--tasks", "arithmetic_add_sub"]


def _fingerprint(cfg, tiny_model, data_dir):
    model, tokenizer = tiny_model
    return protocol_fingerprint(cfg, model=model, tokenizer=tokenizer, train_checksum="t" * 64,
                                eval_checksums={"arithmetic_add_sub": "e" * 64}, data_dir=data_dir)


def test_fingerprint_ignores_the_method_and_names_each_protocol_difference(tiny_model, data_dir):
    base = config_from_args(SMOKE + ["--methods", "lora"])
    same = config_from_args(SMOKE + ["--methods", "linchain:n=5,lr=1e-4", "--rank", "4", "--seeds", "3"])
    a, b = _fingerprint(base, tiny_model, data_dir), _fingerprint(same, tiny_model, data_dir)
    assert a == b and len(a["hash"]) == 12
    for flag, part in [(["--train-on-inputs"], "train_on_inputs"), (["--cutoff-len", "64"], "cutoff_len"),
                       (["--num-beams", "2"], "num_beams"), (["--prompt-format", "chat"], "prompt_format"),
                       (["--max-steps", "3"], "max_steps"), (["--grad-accum", "2"], "effective_batch")]:
        other = _fingerprint(config_from_args(SMOKE + ["--methods", "lora"] + flag), tiny_model, data_dir)
        assert other["hash"] != a["hash"], flag
        assert part in differing_parts(a, other), (flag, differing_parts(a, other))
    # only the parts that differ are named: the hash is the canonical JSON of the parts
    assert short_hash(a["parts"]) == a["hash"]
    decoded = a["parts"]["task_protocol"]["arithmetic_add_sub"]
    assert decoded["generation_kwargs"]["max_gen_toks"] > 0 and decoded["filters"]


def test_weights_checksum_follows_the_weights_not_the_object(tiny_model, tmp_path):
    import torch

    from harness.models import load_model

    model, _ = tiny_model
    again, _ = load_model("tiny-random")
    assert weights_checksum(model) == weights_checksum(again)
    with torch.no_grad():
        next(again.parameters()).view(-1)[0] += 1e-3
    assert weights_checksum(model) != weights_checksum(again)
    # a model loaded from a folder is hashed from its files, and the same weights saved twice agree
    model.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert weights_checksum(loaded) == weights_checksum(AutoModelForCausalLM.from_pretrained(tmp_path / "m"))


def _systems(shift: float = 0.0):
    """A base row and two methods x two seeds, with per-item verdicts on 40 items."""
    base = SystemResult(method="base", scores={"t": 0.1}, correct={"t": {i: float(i < 4) for i in range(40)}})
    results = []
    for seed in (0, 1):
        for label, k in (("lora", 20), ("moslora", 24)):
            k = min(40, k + seed + int(shift))
            results.append(SystemResult(method=label, seed=seed, scores={"t": k / 40}, trainable_params=10,
                                        correct={"t": {i: float(i < k) for i in range(40)}},
                                        loss_curve=[(1, 2.0), (2, 1.5)]))
    return base, results


def _content(name: str, fingerprint: dict, shift: float = 0.0):
    base, results = _systems(shift)
    return json.loads(json.dumps(build_result(name, {"methods": ["lora", "moslora"]}, fingerprint, base, results),
                                 default=str))


FP = {"hash": "aaaaaaaaaaaa", "parts": {"train_on_inputs": False, "precision": "fp32", "num_beams": 1}}


def test_result_json_round_trips_every_system(tmp_path):
    base, results = _systems()
    write_result_json(tmp_path, build_result("r", {"x": 1}, FP, base, results))
    content = load_result_json(tmp_path)
    assert content["fingerprint"] == FP and content["config"] == {"x": 1}
    assert {"commit", "dirty"} <= set(content["git"]) and "torch" in content["versions"]
    base2, results2 = systems_of(content)
    assert base2.scores == base.scores
    assert [(r.method, r.seed, r.scores, r.loss_curve) for r in results2] == \
        [(r.method, r.seed, r.scores, r.loss_curve) for r in results]
    # per-item verdicts survive (doc ids become strings in JSON, identically for every run)
    assert [sum(r.correct["t"].values()) for r in results2] == [sum(r.correct["t"].values()) for r in results]


def test_compare_pairs_runs_and_matches_the_single_run_table():
    from harness.report import summarize

    table, _, notes = hcompare.compare([_content("a", FP), _content("b", FP, shift=1)])
    assert list(table["method"]) == ["base", "a/lora", "a/moslora", "b/lora", "b/moslora"]
    assert set(table["protocol"]) == {"same"} and all("aaaaaaaaaaaa" in n for n in notes)
    # run a's rows are exactly what harness.run's own table says for run a
    base, results = systems_of(_content("a", FP))
    single = summarize(base, results).set_index("method")
    mine = table.set_index("method")
    assert mine.loc["a/moslora", "average"] == pytest.approx(single.loc["moslora", "average"])
    assert mine.loc["a/moslora", "gain_vs_lora"] == pytest.approx(single.loc["moslora", "gain_vs_lora"])


def test_compare_refuses_other_protocols_unless_allowed():
    other = copy.deepcopy(FP)
    other["parts"]["train_on_inputs"] = True
    other["hash"] = "bbbbbbbbbbbb"
    with pytest.raises(UserError) as err:
        hcompare.compare([_content("a", FP), _content("b", other)])
    message = str(err.value)
    assert "train_on_inputs" in message and "precision" not in message and "--allow-mismatch" in message
    assert "\n" not in message
    table, _, notes = hcompare.compare([_content("a", FP), _content("b", other)], allow_mismatch=True)
    flagged = table.set_index("method")["protocol"]
    assert flagged["a/lora"] == "same" and flagged["b/lora"] == "differs: train_on_inputs"
    assert any("WARNING" in n for n in notes)


@pytest.mark.parametrize("part,values", [("architecture", ("llama", "gpt2")),
                                         ("base_model", ("tiny-random", "tiny-random-gpt2"))])
def test_compare_refuses_runs_on_another_architecture_or_base_model(tmp_path, capsys, part, values):
    """One line, exit 2, naming both runs' values; --allow-mismatch compares them anyway, flagged."""
    fingerprints = []
    for name, value in zip("ab", values):
        fp = copy.deepcopy(FP)
        fp["parts"][part] = value
        fp["hash"] = name * 12
        fingerprints.append(fp)
        (tmp_path / name).mkdir()
        write_result_json(tmp_path / name, _content(name, fp))
    assert hcompare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"different {part.replace('_', ' ')}s (a {values[0]}, b {values[1]})" in err
    assert "--allow-mismatch" in err
    table, _, _ = hcompare.compare([_content("a", fingerprints[0]), _content("b", fingerprints[1])],
                                   allow_mismatch=True)
    assert table.set_index("method")["protocol"]["b/lora"] == f"differs: {part}"


def test_the_fingerprint_records_the_architecture(data_dir):
    from harness.models import TINY_MODELS, load_model

    for name in ("tiny-random", "tiny-random-gpt2", "tiny-random-phi3"):
        cfg = config_from_args(SMOKE[2:] + ["--model", name])
        fp = _fingerprint(cfg, load_model(name), data_dir)
        assert fp["parts"]["architecture"] == {"llama": "llama", "gpt2": "gpt2", "phi3": "phi3"}[TINY_MODELS[name]]
        assert fp["parts"]["base_model"] == name


def test_compare_command_line_bad_input(tmp_path, capsys):
    (tmp_path / "good").mkdir()
    write_result_json(tmp_path / "good", _content("good", FP))
    cases = [
        ([str(tmp_path / "good")], "at least two runs"),
        ([str(tmp_path / "good"), str(tmp_path)], "is not a results folder"),
        ([str(tmp_path / "good"), str(tmp_path / "missing")], "does not exist"),
        ([str(tmp_path / "good"), "0123456789abcdef", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
         "neither a folder nor a run"),
    ]
    for argv, expected in cases:
        assert hcompare.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


@pytest.mark.integration
def test_compare_two_real_runs_by_folder_and_by_mlflow_run_id(tmp_path, data_dir, mlflow_runs_of):
    """Two harness.run invocations launched apart compare like one; a changed protocol is refused."""
    from harness.run import run

    outcomes = []
    for name in ("first", "second"):
        cfg = config_from_args(SMOKE + ["--methods", "lora,moslora", "--run-name", name,
                                        "--output-dir", str(tmp_path / "results"),
                                        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
        outcomes.append(run(cfg, progress=False, log=lambda *a, **k: None))
    first, second = (o.run_dir for o in outcomes)
    assert (first / "result.json").is_file()
    summary = pd.read_csv(first / "summary.csv").set_index("method")
    table, _, _ = hcompare.compare([load_result_json(first), load_result_json(second)])
    table = table.set_index("method")
    # same seed, same data, same protocol: the runs agree item for item, and with harness.run's table
    assert table.loc["first/moslora", "average"] == pytest.approx(summary.loc["moslora", "average"])
    assert table.loc["second/moslora", "average"] == pytest.approx(summary.loc["moslora", "average"])
    # by MLflow run id: the parent run carries result.json, the fingerprint tag and per-method metrics
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert hcompare.main([outcomes[0].parent_run_id, str(second), "--tracking-uri", uri]) == 0
    runs = mlflow_runs_of(tmp_path)
    parent = runs[runs["run_id"] == outcomes[0].parent_run_id].iloc[0]
    assert parent["tags.protocol"] == load_result_json(first)["fingerprint"]["hash"]
    assert parent["metrics.average/moslora"] == pytest.approx(summary.loc["moslora", "average"])
    # the UI opens the experiment on its training runs (MLflow 3 shows a GenAI overview otherwise)
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(uri).get_experiment_by_name("lora-harness")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # a run with another loss masking is refused, naming that part
    changed = tmp_path / "changed"
    shutil.copytree(second, changed)
    content = load_result_json(changed)
    content["fingerprint"]["parts"]["train_on_inputs"] = not content["fingerprint"]["parts"]["train_on_inputs"]
    write_result_json(changed, content)
    with pytest.raises(UserError, match="train_on_inputs"):
        hcompare.compare([load_result_json(first), load_result_json(changed)])


def test_systems_of_ignores_unknown_fields():
    base, results = _systems()
    content = json.loads(json.dumps(build_result("r", {}, FP, base, results), default=str))
    content["systems"][1]["a_field_from_the_future"] = 1
    _, again = systems_of(content)
    assert dataclasses.asdict(again[0])["method"] == "lora"


def test_a_run_result_writes_what_its_training_and_evaluation_hold_and_reads_back():
    """harness.run's MethodResult holds the TrainResult and EvalResult; result.json has their numbers, flat."""
    from harness.evaluate import EvalResult, Sample
    from harness.run import MethodResult
    from harness.train import TrainResult

    training = TrainResult(steps=4, losses=[(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.0)], train_seconds=8.0, tokens=400,
                           peak_memory_mb=50.0, grad_norms=[(1, 3.0), (2, 1.0), (3, 2.0), (4, 0.5)],
                           clipped_fraction=0.25)
    samples = {"t": [Sample(doc_id=i, target="1", response="1" if i < 3 else "2", correct=int(i < 3))
                     for i in range(4)]}
    evaluation = EvalResult(scores={"t": 0.75, "group": 0.75}, samples=samples)  # a group has no samples of its own
    result = MethodResult(method="lora", seed=0, trainable_params=10, training=training, evaluation=evaluation,
                          contaminated={"t"})
    assert result.scores == {"t": 0.75} and result.correct == {"t": {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0}}
    assert (result.train_seconds, result.seconds_per_step, result.tokens_per_second) == (8.0, 2.0, 50.0)
    assert result.grad_norm_median == 1.5 and result.clipped_fraction == 0.25 and result.loss_curve == training.losses
    failed = MethodResult(method="moslora", seed=0, error="NonFiniteLoss: loss became nan at step 2")
    assert not failed.ok and failed.scores == {} and failed.loss_curve == [] and math.isnan(failed.train_seconds)

    content = json.loads(json.dumps(build_result("r", {}, FP, None, [result, failed]), default=str))
    _, (again, again_failed) = systems_of(content)
    assert again.scores == result.scores and again.correct == {"t": {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0}}
    assert again.loss_curve == training.losses and again.seconds_per_step == 2.0 and again.grad_norm_median == 1.5
    assert again.contaminated == {"t"} and again_failed.contaminated == set()  # sets, not their repr
    assert again_failed.error == failed.error and again_failed.loss_curve == []


def test_a_result_file_written_with_the_repr_of_a_set_reads_back_the_set():
    base, results = _systems()
    content = json.loads(json.dumps(build_result("r", {}, FP, base, results), default=str))
    content["systems"][0]["contaminated"], content["systems"][1]["contaminated"] = "{'t'}", "set()"
    base_again, again = systems_of(content)
    assert base_again.contaminated == {"t"} and again[0].contaminated == set()


def test_command_line_is_one_line_in_a_real_process(tmp_path):
    """The one real process of ``python -m harness.compare``: the entry point, exit 2 and one line, no traceback
    (the other command-line checks call ``main(argv)`` in this process)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "harness.compare", str(tmp_path), str(tmp_path / "missing")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a results folder" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def _labelled(labels_and_k: dict[str, int]):
    base = SystemResult(method="base", scores={"t": 0.1}, correct={"t": {i: float(i < 4) for i in range(40)}})
    results = [SystemResult(method=label, seed=seed, scores={"t": (k + seed) / 40}, trainable_params=10,
                            correct={"t": {i: float(i < k + seed) for i in range(40)}})
               for seed in (0, 1) for label, k in labels_and_k.items()]
    return base, results


def test_compare_summary_and_diagnostics_take_the_same_reference():
    """One rule everywhere: plain lora where there is one, else the first LoRA of any kind (a matched one)."""
    from harness.diagnostics.claims import reference_label
    from harness.report import summarize

    matched = "lora-r18-match-linchain-3"
    base, results = _labelled({"linchain-3": 24, matched: 20})
    table = summarize(base, results).set_index("method")
    # the gain is over the matched LoRA, the only LoRA of the run: 24 - 20 items of 40 per seed
    assert table.loc["linchain-3", "gain_vs_lora"] == pytest.approx(4 / 40, abs=1e-12)
    rows = [{"method": "linchain-3", "spec_method": "linchain"}, {"method": matched, "spec_method": "lora"}]
    assert reference_label(rows) == matched

    def content(name, labels_and_k):
        b, rs = _labelled(labels_and_k)
        return json.loads(json.dumps(build_result(name, {"methods": list(labels_and_k)}, FP, b, rs), default=str))

    # run a has only a matched LoRA, run b a plain one: plain lora is the reference, wherever it stands
    table, _, _ = hcompare.compare([content("a", {"linchain-3": 24, matched: 20}), content("b", {"lora": 22})])
    gains = table.set_index("method")["gain_vs_lora"]
    assert math.isnan(gains["lora"])  # the reference has no gain over itself
    assert gains["linchain-3"] == pytest.approx(2 / 40, abs=1e-12) and gains[matched] == pytest.approx(-2 / 40, abs=1e-12)
    # without a plain lora, compare takes the matched LoRA, as the run's own table did
    table, _, _ = hcompare.compare([content("a", {"linchain-3": 24, matched: 20}), content("b", {"moslora": 21})])
    gains = table.set_index("method")["gain_vs_lora"]
    assert math.isnan(gains[matched]) and gains["moslora"] == pytest.approx(1 / 40, abs=1e-12)


def test_a_run_name_that_starts_like_a_method_never_makes_a_row_the_reference():
    """Runs named lora-variants-a and -b with only DoRA and PiSSA: no row is a LoRA, so no gain over LoRA."""
    def content(name):
        b, rs = _labelled({"dora": 22, "pissa": 21})
        return json.loads(json.dumps(build_result(name, {"methods": ["dora", "pissa"]}, FP, b, rs), default=str))

    table, _, _ = hcompare.compare([content("lora-variants-a"), content("lora-variants-b")])
    assert list(table["method"])[1:] == ["lora-variants-a/dora", "lora-variants-a/pissa", "lora-variants-b/dora",
                                         "lora-variants-b/pissa"]
    assert table["gain_vs_lora"].isna().all() and table.attrs["reference"] is None


def test_the_summary_names_a_reference_that_is_not_plain_lora():
    from harness.report import summarize, summary_markdown

    matched = "lora-r18-match-linchain-3"
    base, results = _labelled({"linchain-3": 24, matched: 20})
    text = summary_markdown(summarize(base, results), ["t"])
    assert f"*gain vs LoRA* is against `{matched}`, the first LoRA of the table (no plain `lora` ran)." in text
    base, results = _labelled({"linchain-3": 24, "lora": 20})
    assert "*gain vs LoRA* is against" not in summary_markdown(summarize(base, results), ["t"])
