"""Scoring an adapter outside a run: ``harness.evaluate --adapter``, the evaluation-path report, the silent-adapter guard.

The property a user relies on: the number the harness reports for an adapter is the number they get
from the merged model and from lm-eval's own command line on the export, item for item in fp32; and an
adapter that changes nothing (the class of bug where a loader drops the weights) never passes as a result.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch

from harness.adapters import get_adapter_model, save_adapter
from harness.equivalence import PathResult, Report, agreement, main as equivalence_main
from harness.evaluate import AdapterSource, EvalResult, Sample, locate_adapter, main as evaluate_main
from harness.models import tiny_random_model
from harness.report import BASE, SystemResult, same_outputs, summarize, summary_markdown

# a generation task and a multiple-choice one: tiny-random generates empty text, so only the choice
# log-likelihoods show whether an adapter changed the model
TASKS = "arithmetic_add_sub,llm_adapters_piqa_mc"


def _save(spec: str, folder: Path, perturb: float | None) -> Path:
    torch.manual_seed(1)
    model = get_adapter_model(copy.deepcopy(tiny_random_model(seed=0)), spec, r=8, alpha=16)
    if perturb is not None:  # B != 0: the adapter changes the model (a fresh one starts at B = 0, the base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, perturb)
    return save_adapter(model, folder)


@pytest.fixture(scope="module")
def linchain(tmp_path_factory) -> Path:
    return _save("linchain", tmp_path_factory.mktemp("adapters") / "linchain", perturb=0.5)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    return _save("lora", tmp_path_factory.mktemp("adapters") / "lora-untrained", perturb=None)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------------------------------------
# The report's rules, on made-up paths


def path(name: str, answers: list[str], target: str = "1", precision: str = "fp32", outputs=None) -> PathResult:
    samples = {("t", i): Sample(i, target, a, int(a == target), output=(outputs or answers)[i])
               for i, a in enumerate(answers)}
    return PathResult(name, precision, samples, seconds=1.0)


def report(*results: PathResult) -> Report:
    return Report(AdapterSource(Path("a"), "a"), "m", list(results), [])


def test_agreement_counts_flips_and_differing_answers_against_the_reference():
    reference = path("harness", ["1", "1", "2", "3"])
    other = path("merged", ["1", "2", "3", "3"])  # item 1 flips right->wrong; item 2 differs, wrong both times
    agree = agreement(reference, other)
    assert agree.items == 4 and agree.flips == [("t", 1)] and agree.answers == [("t", 1), ("t", 2)]
    assert agree.flip_rate == 0.25 and not agree.identical


def test_a_fp32_path_that_differs_on_one_item_fails_the_report_and_bf16_differences_do_not():
    base = path("base", ["9", "9", "9"])
    ok = report(base, path("harness", ["1", "2", "1"]), path("merged", ["1", "2", "1"]),
                path("lm-eval", ["1", "2", "1"]), path("lm-eval", ["2", "2", "1"], precision="bf16"))
    assert ok.failures() == []
    bf16 = next(r for r in ok.rows() if r["precision"] == "bf16")
    assert bf16["flips_vs_harness_fp32"] == 1 and bf16["flip_rate"] == pytest.approx(1 / 3)
    bad = report(base, path("harness", ["1", "2", "1"]), path("merged", ["1", "2", "1"]),
                 path("lm-eval", ["1", "2", "3"]))
    assert len(bad.failures()) == 1 and "lm-eval path gives a different answer" in bad.failures()[0]
    assert "FAILED" in bad.markdown() and "| t | 2 |" in bad.markdown()  # the differing item is shown


def test_an_adapter_whose_outputs_equal_the_base_models_fails_the_report():
    same = report(path("base", ["1", "2"], outputs=["a", "b"]), path("harness", ["1", "2"], outputs=["a", "b"]))
    assert any("equal the base model's on every item" in f for f in same.failures())
    changed = report(path("base", ["1", "2"], outputs=["a", "b"]), path("harness", ["1", "2"], outputs=["a", "c"]))
    assert changed.failures() == []  # same answers, different raw output: the adapter was applied


# ----------------------------------------------------------------------------------------------------------
# The guard in a run's summary


def _system(method, seed, digests) -> SystemResult:
    return SystemResult(method=method, seed=seed, scores={"t": 0.5}, correct={"t": {0: 1.0, 1: 0.0}},
                        outputs=digests)


def test_summary_flags_a_seed_whose_outputs_equal_the_base_models_and_only_that_seed():
    base = _system(BASE, None, {"t": "d0"})
    results = [_system("lora", 0, {"t": "d1"}), _system("moslora", 0, {"t": "d0"}),
               _system("moslora", 1, {"t": "d2"})]
    assert same_outputs(results[1], base) and not same_outputs(results[0], base)
    assert not same_outputs(_system("lora", 0, {}), base)  # no digests (an old result.json): no claim
    table = summarize(base, results, n_resamples=50)
    assert dict(zip(table["method"], table["same_as_base"])) == {BASE: "", "lora": "", "moslora": "0"}
    markdown = summary_markdown(table, ["t"])
    assert "## Adapters that changed nothing" in markdown and "`moslora` seed(s) 0" in markdown
    assert "`lora` seed" not in markdown
    clean = summary_markdown(summarize(base, results[:1], n_resamples=50), ["t"])
    assert "changed nothing" not in clean


def test_output_digests_tell_apart_any_item_that_changed():
    def result(outputs):
        return EvalResult(samples={"t": [Sample(i, "1", "1", 1, output=o) for i, o in enumerate(outputs)]})

    assert result(["a", "b"]).output_digests() == result(["a", "b"]).output_digests()
    assert result(["a", "b"]).output_digests() != result(["a", "c"]).output_digests()
    # the same outputs on swapped items are a different system
    assert result(["a", "b"]).output_digests() != result(["b", "a"]).output_digests()


# ----------------------------------------------------------------------------------------------------------
# harness.evaluate --adapter


def test_evaluate_scores_an_adapter_and_writes_the_samples_a_run_writes(linchain, untrained, tmp_path, data_dir,
                                                                        capsys):
    out = tmp_path / "scored"
    args = ["--model", "tiny-random", "--tasks", TASKS, "--limit", "3", "--data-dir", str(data_dir)]
    assert evaluate_main([*args, "--adapter", str(linchain), "--output-dir", str(out)]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    lines = [json.loads(line) for line in (out / "samples" / "linchain.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and set(lines[0]) == {"task", "doc_id", "target", "response", "correct", "output"}
    recorded = json.loads((out / "scores.json").read_text())
    assert recorded["scores"] == scores and recorded["adapter"] == str(linchain) and recorded["model"] == "tiny-random"
    piqa = [line for line in lines if line["task"] == "llm_adapters_piqa_mc"]
    assert scores["llm_adapters_piqa_mc"] == pytest.approx(sum(line["correct"] for line in piqa) / len(piqa))
    # the base model, and an untrained adapter (B = 0), give other outputs than the trained adapter...
    assert evaluate_main([*args, "--output-dir", str(tmp_path / "base")]) == 0
    assert evaluate_main([*args, "--adapter", str(untrained), "--output-dir", str(tmp_path / "zero")]) == 0
    base = [json.loads(x) for x in (tmp_path / "base" / "samples" / "base.jsonl").read_text().splitlines()]
    zero = [json.loads(x) for x in (tmp_path / "zero" / "samples" / "lora-untrained.jsonl").read_text().splitlines()]
    assert [x["output"] for x in zero] == [x["output"] for x in base]  # ...the untrained one exactly the base's
    assert [x["output"] for x in lines] != [x["output"] for x in base]


def test_a_results_folder_and_a_label_find_the_adapter_and_the_runs_settings(linchain, tmp_path):
    run = tmp_path / "run-1"
    (run / "adapters").mkdir(parents=True)
    for label in ("lora-seed0", "lora-seed1", "linchain-3-seed0"):
        (run / "adapters" / label).symlink_to(linchain)
    (run / "result.json").write_text(json.dumps({"config": {"model": "tiny-random", "tasks": ["arithmetic"],
                                                            "prompt_format": "chat"}}))
    source = locate_adapter(run, "linchain-3")  # one seed: the method label is enough
    assert source.folder == run / "adapters" / "linchain-3-seed0" and source.name == "linchain-3-seed0"
    assert source.model() == "tiny-random" and source.run_config["prompt_format"] == "chat"
    assert locate_adapter(run / "adapters" / "lora-seed1").run_config["tasks"] == ["arithmetic"]


@pytest.mark.parametrize("label, expected", [
    (None, "is a results folder: name one of its adapters with --label (linchain-3-seed0, lora-seed0, lora-seed1)"),
    ("lora", "has several seeds for --label lora"),
    ("dora", "has no adapter for --label dora"),
])
def test_a_results_folder_without_a_clear_label_is_one_line(linchain, tmp_path, capsys, label, expected):
    run = tmp_path / "run-1"
    (run / "adapters").mkdir(parents=True)
    for name in ("lora-seed0", "lora-seed1", "linchain-3-seed0"):
        (run / "adapters" / name).symlink_to(linchain)
    argv = ["--model", "tiny-random", "--adapter", str(run), "--output-dir", str(tmp_path / "out")]
    assert evaluate_main(argv + (["--label", label] if label else [])) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_an_adapter_for_another_model_in_one_line(tmp_path, capsys):
    folder = tmp_path / "foreign"
    foreign = get_adapter_model(copy.deepcopy(tiny_random_model(seed=0)), "lora", r=4, alpha=8, targets=["q_proj"])
    save_adapter(foreign, folder)
    # the same adapter on a model whose q_proj has another shape: a base model it was not trained on
    weights = folder / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = {k: torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    (folder / "harness").rename(tmp_path / "factored-moved-away")  # score the plain form only
    assert evaluate_main(["--model", "tiny-random", "--adapter", str(folder), "--limit", "1",
                          "--output-dir", str(tmp_path / "out")]) == 2
    assert "pass the model it was trained on" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# harness.equivalence


@pytest.mark.parametrize("argv, expected", [
    (["{nowhere}"], "no adapter at"),
    (["{adapter}", "--precisions", "bf16"], "--precisions must include fp32"),
    (["{adapter}", "--precisions", "fp16"], "--precisions: fp16"),
    (["{adapter}", "--paths", "harness,onnx"], "--paths: unknown path onnx"),
    (["{adapter}", "--limit", "0"], "--limit 0"),
    (["{adapter}", "--tasks", "nope"], "unknown task nope"),
])
def test_equivalence_bad_input_is_one_line_and_writes_nothing(linchain, tmp_path, capsys, argv, expected):
    argv = [a.format(nowhere=tmp_path / "nowhere", adapter=linchain) for a in argv]
    out = tmp_path / "out"
    assert equivalence_main([*argv, "--model", "tiny-random", "--output-dir", str(out)]) == 2
    assert expected in one_line_error(capsys)
    assert not out.exists()


def test_equivalence_refuses_a_bias_adapter_which_has_no_plain_form(tmp_path, capsys):
    folder = _save("linchain:bias=true", tmp_path / "affine", perturb=0.1)
    assert equivalence_main([str(folder), "--model", "tiny-random", "--output-dir", str(tmp_path / "out")]) == 2
    assert "bias=true" in one_line_error(capsys) and not (tmp_path / "out").exists()


def test_equivalence_fails_an_adapter_that_changes_nothing(untrained, tmp_path, data_dir, capsys):
    out = tmp_path / "report"
    code = equivalence_main([str(untrained), "--model", "tiny-random", "--tasks", TASKS, "--limit", "4",
                             "--data-dir", str(data_dir), "--paths", "harness,merged", "--output-dir", str(out)])
    assert code == 1
    markdown = (out / "equivalence.md").read_text()
    assert "FAILED" in markdown and "equal the base model's on every item" in markdown


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    with open(out / "equivalence.csv") as f:
        return {(r["path"], r["precision"]): r for r in csv.DictReader(f)}


@pytest.mark.integration
def test_fp32_paths_agree_item_for_item_on_tiny_random(linchain, tmp_path, data_dir):
    """The harness in-process, the merged model and lm-eval's own command line on the export: the same answer
    on every item, and a table that says so."""
    out = tmp_path / "report"
    code = equivalence_main([str(linchain), "--model", "tiny-random", "--tasks", TASKS, "--limit", "5",
                             "--data-dir", str(data_dir), "--precisions", "fp32", "--output-dir", str(out)])
    assert code == 0, (out / "equivalence.md").read_text()
    rows = _rows(out)
    for name in ("merged", "lm-eval"):
        assert rows[(name, "fp32")]["answers_differ"] == "0" and rows[(name, "fp32")]["items_unmatched"] == "0"
        assert rows[(name, "fp32")]["items"] == "10"
    assert rows[("vllm", "fp32")]["skipped"]  # no CUDA GPU here
    with open(out / "items.csv") as f:
        items = list(csv.DictReader(f))
    by_path = {}
    for row in items:
        by_path.setdefault(row["path"], []).append((row["task"], row["doc_id"], row["response"], row["correct"]))
    assert by_path["harness"] == by_path["merged"] == by_path["lm-eval"]


@pytest.mark.integration
def test_fp32_paths_agree_item_for_item_on_the_embedded_model(tmp_path):
    """The same on SmolLM2-135M with a perturbed LinChain adapter, on the first 10 items of each arithmetic task."""
    from harness.models import load_model

    model, _ = load_model("smollm2-135m-instruct")
    torch.manual_seed(0)
    peft_model = get_adapter_model(model, "linchain", r=8, alpha=16, targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    folder = save_adapter(peft_model, tmp_path / "linchain")
    del model, peft_model
    out = tmp_path / "report"
    code = equivalence_main([str(folder), "--model", "smollm2-135m-instruct", "--tasks", "arithmetic", "--limit", "10",
                             "--precisions", "fp32", "--paths", "harness,merged,lm-eval", "--output-dir", str(out)])
    assert code == 0, (out / "equivalence.md").read_text()
    rows = _rows(out)
    assert rows[("merged", "fp32")]["answers_differ"] == rows[("lm-eval", "fp32")]["answers_differ"] == "0"
    assert rows[("lm-eval", "fp32")]["items"] == "20"
