"""harness.evaluate on the tiny model, and the tasks under lm-eval's own command line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.errors import UserError
from harness.evaluate import TASKS_DIR, evaluate, mlflow_name


@pytest.mark.integration
def test_result_has_mlflow_safe_metrics_scores_and_samples(tiny_model, data_dir):
    model, tok = tiny_model
    result = evaluate(model, tok, ["arithmetic", "llm_adapters_aqua", "llm_adapters_boolq_mc"], data_dir,
                      limit=3, batch_size=2)
    assert set(result.scores) == {"arithmetic", "arithmetic_add_sub", "arithmetic_add_sub_word",
                                  "llm_adapters_aqua", "llm_adapters_boolq_mc"}
    assert all(0.0 <= s <= 1.0 for s in result.scores.values())
    names = result.flat_metrics()
    assert "arithmetic_add_sub/exact_match" in names and "llm_adapters_aqua/exact_match_upstream" in names
    assert "llm_adapters_boolq_mc/acc_norm" in names and not any("," in n for n in names)
    for task in ("arithmetic_add_sub", "llm_adapters_aqua", "llm_adapters_boolq_mc"):
        samples = result.samples[task]
        assert [s.doc_id for s in samples] == [0, 1, 2]  # one per item, primary filter only
        assert all(s.correct in (0, 1) for s in samples)
        assert result.scores[task] == pytest.approx(sum(s.correct for s in samples) / 3)


@pytest.mark.integration
def test_batched_generation_scores_like_one_at_a_time(tiny_model, data_dir):
    model, tok = tiny_model
    tasks = ["arithmetic_add_sub", "llm_adapters_boolq", "llm_adapters_piqa_mc"]
    one = evaluate(model, tok, tasks, data_dir, limit=6, batch_size=1)
    batched = evaluate(model, tok, tasks, data_dir, limit=6, batch_size=4)
    assert one.scores == batched.scores
    for task in tasks:
        responses = [s.response for s in one.samples[task]]
        assert responses == [s.response for s in batched.samples[task]], task
    raw_one = [s["resps"] for s in one.raw["samples"]["arithmetic_add_sub"]]
    assert raw_one == [s["resps"] for s in batched.raw["samples"]["arithmetic_add_sub"]]


def test_peft_model_in_memory_and_global_seeds_untouched(tiny_model, data_dir):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    random.seed(5), torch.manual_seed(5)
    result = evaluate(peft_model, tok, ["arithmetic_add_sub"], data_dir, limit=2, batch_size=2, num_beams=2)
    after = (random.random(), torch.rand(1).item())
    random.seed(5), torch.manual_seed(5)
    assert after == (random.random(), torch.rand(1).item())
    assert len(result.samples["arithmetic_add_sub"]) == 2


def test_chat_prompt_format_uses_the_chat_template(tiny_model, data_dir):
    model, tok = tiny_model
    result = evaluate(model, tok, ["arithmetic_add_sub"], data_dir, limit=1, prompt_format="chat")
    context = result.raw["samples"]["arithmetic_add_sub"][0]["arguments"][0][0]
    assert context.startswith("<|im_start|>user\nWhat is ") and context.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("kwargs, expected", [
    ({"tasks": ["no_such_task"]}, r"unknown task no_such_task \(known: arithmetic"),
    ({"prompt_format": "markdown"}, "unknown prompt format"),
    ({"num_beams": 0}, "num_beams=0"),
])
def test_bad_requests_are_user_errors(tiny_model, data_dir, kwargs, expected):
    model, tok = tiny_model
    with pytest.raises(UserError, match=expected):
        evaluate(model, tok, **{"tasks": ["arithmetic"], "data_dir": data_dir, "limit": 1, **kwargs})


def test_mlflow_names():
    assert mlflow_name("gsm8k", "exact_match,answer") == "gsm8k/exact_match"
    assert mlflow_name("aqua", "exact_match_stderr,upstream") == "aqua/exact_match_stderr_upstream"
    assert mlflow_name("boolq_mc", "acc,none") == "boolq_mc/acc"
    assert mlflow_name("x", "alias") is None


@pytest.mark.integration
def test_tasks_run_under_lm_eval_command_line(tiny_model, data_dir, tmp_path):
    model, tok = tiny_model
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HARNESS_DATA_DIR": str(data_dir)}
    lm_eval = Path(sys.executable).parent / "lm_eval"
    run = subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={folder}", "--include_path", str(TASKS_DIR),
         "--tasks", "arithmetic", "--limit", "2", "--output_path", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert {"arithmetic_add_sub", "arithmetic_add_sub_word"} <= set(results)
    assert "exact_match,answer" in results["arithmetic_add_sub"]


def test_cli_unknown_task_exits_2(capsys, data_dir):
    from harness.evaluate import main

    assert main(["--model", "tiny-random", "--tasks", "nope", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task nope") and err.count("\n") == 1


def test_bf16_evaluation_runs_the_model_under_bf16_autocast(tiny_model, data_dir, monkeypatch):
    from harness import models

    monkeypatch.setattr(models, "bf16_is_fast", lambda device: True)
    model, tok = tiny_model
    seen = []
    model.model.register_forward_hook(lambda *_: seen.append(torch.get_autocast_dtype("cpu")
                                                             if torch.is_autocast_enabled("cpu") else None))
    evaluate(model.to(torch.bfloat16), tok, ["arithmetic_add_sub", "llm_adapters_piqa_mc"], data_dir, limit=2,
             batch_size=2, precision="bf16")
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    evaluate(model.float(), tok, ["arithmetic_add_sub"], data_dir, limit=2, batch_size=2, precision="fp32")
    assert seen and set(seen) == {None}


@pytest.mark.integration
def test_command_line_is_one_line_in_a_real_process(tmp_path):
    """The one real process of ``python -m harness.evaluate``: the entry point, exit 2 and one line, no traceback
    (the other command-line checks call ``main(argv)`` in this process)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "harness.evaluate", "--model", "tiny-random", "--tasks", "nope"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown task nope" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
