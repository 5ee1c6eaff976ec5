"""The saved adapter folder: every client reads it right, and the export command.

``save_adapter`` writes one folder per method and seed. Its top level must be an exact plain LoRA that
vanilla peft (a process that never imports ``harness``) loads without warnings and with the method's
logits; the factored form inside it must reload as the method; a ``bias=true`` adapter, which no
plain LoRA reproduces, must make vanilla peft raise instead of loading something else.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.adapters import get_adapter_model, load_adapter_model, save_adapter
from harness.adapters.chain import MiddleFactor
from harness.adapters.condlora import GeneratedFactor
from harness.adapters.spec import METHODS
from harness.models import tiny_random_model

REPO = Path(__file__).resolve().parents[1]
R, ALPHA = 8, 16
# Every method of the registry, and the options that change what is stored (shapes, products, forms).
SPECS = ["lora", "moslora", "linchain", "linchain:widths=8-16-4-8", "mtlora:structure=shim",
         "mtlora:structure=icfm", "mtlora:structure=dtsm", "condlora", "moslora:freeze_middle=true",
         "lora:match=linchain:r=4,widths=4-16-4", "dora", "rslora", "pissa", "olora"]
BIAS = "linchain:bias=true"
FACTOR_CLASS = {"lora": torch.nn.Linear, "moslora": MiddleFactor, "linchain": MiddleFactor, "mtlora": MiddleFactor,
                "condlora": GeneratedFactor, "dora": torch.nn.Linear, "rslora": torch.nn.Linear,
                "pissa": torch.nn.Linear, "olora": torch.nn.Linear}


def test_the_specs_cover_every_method_of_the_registry():
    assert {s.split(":")[0] for s in SPECS} == set(METHODS)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def trained_adapter(base, ids, spec, steps=3):
    """The method on a copy of ``base``, trained a few steps so that B != 0 and every factor matters."""
    torch.manual_seed(1)
    model = get_adapter_model(copy.deepcopy(base), spec, r=R, alpha=ALPHA)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def first_factor(model):
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    return layer.lora_A["default"]


@pytest.fixture(scope="module")
def base():
    return tiny_random_model(seed=0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def saved(base, ids, tmp_path_factory):
    """Each spec (and the bias one) trained, saved with save_adapter; the folders, models and their logits."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for i, spec in enumerate([*SPECS, BIAS]):
        model = trained_adapter(base, ids, spec)
        out[spec] = (save_adapter(model, root / "adapters" / f"a{i}"), model, logits(model, ids))
    return out


@pytest.fixture(scope="module")
def vanilla(base, ids, saved, tmp_path_factory):
    """One process without ``harness`` loads every main folder with vanilla peft: logits, warnings, errors."""
    work = tmp_path_factory.mktemp("vanilla")
    base.save_pretrained(work / "base")
    torch.save(ids, work / "ids.pt")
    folders = {spec: str(folder) for spec, (folder, _, _) in saved.items()}
    (work / "folders.json").write_text(json.dumps(folders))
    script = textwrap.dedent(f"""
        import json, sys, warnings
        import torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        work = {str(work)!r}
        ids = torch.load(work + "/ids.pt")
        report = {{}}
        for spec, folder in json.load(open(work + "/folders.json")).items():
            base = AutoModelForCausalLM.from_pretrained(work + "/base")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    model = PeftModel.from_pretrained(base, folder).eval()
                except Exception as err:
                    report[spec] = {{"error": type(err).__name__ + ": " + str(err)}}
                    continue
            with torch.no_grad():
                torch.save(model(ids).logits, work + f"/{{len(report)}}.pt")
            report[spec] = {{"logits": work + f"/{{len(report)}}.pt", "warnings": [str(w.message) for w in caught]}}
        assert not any(m == "harness" or m.startswith("harness.") for m in sys.modules), "harness was imported"
        json.dump(report, open(work + "/report.json", "w"))
    """)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "report.json").read_text()), done.stderr


@pytest.mark.parametrize("spec", SPECS)
def test_vanilla_peft_loads_the_saved_folder_as_the_method_without_warnings(saved, vanilla, spec):
    report, stderr = vanilla
    got = report[spec]
    assert "error" not in got, got
    noisy = [w for w in got["warnings"] if any(s in w.lower() for s in ("missing", "unexpected", "harness_spec"))]
    assert noisy == []
    assert "missing adapter keys" not in stderr.lower() and "unexpected keyword" not in stderr.lower()
    assert torch.allclose(torch.load(got["logits"]), saved[spec][2], rtol=1e-5, atol=1e-5)


def test_vanilla_peft_refuses_a_bias_adapter(saved, vanilla):
    report, _ = vanilla
    assert "error" in report[BIAS], report[BIAS]  # raised: it never loaded something else
    folder = saved[BIAS][0]
    assert not (folder / "adapter_config.json").exists() and "bias=true" in (folder / "README.md").read_text()


@pytest.mark.parametrize("spec", [*SPECS, BIAS])
def test_the_harness_reloads_the_saved_folder_as_the_method(base, ids, saved, spec):
    folder, model, expected = saved[spec]
    for where in (folder, folder / "harness"):
        reloaded = load_adapter_model(copy.deepcopy(base), where)
        assert torch.equal(logits(reloaded, ids), expected)
        assert type(first_factor(reloaded)) is type(first_factor(model))
        assert isinstance(first_factor(reloaded), FACTOR_CLASS[spec.split(":")[0]])
        spec_of = [getattr(m.peft_config["default"], "harness_spec", None) for m in (reloaded, model)]
        assert spec_of[0] == spec_of[1]


@pytest.mark.parametrize("spec", SPECS)
def test_the_main_folder_is_the_plain_export_and_the_factored_form_has_no_peft_config(saved, spec):
    folder = saved[spec][0]
    plain = json.loads((folder / "adapter_config.json").read_text())
    # PiSSA's and OLoRA's main folder is peft's conversion to a LoRA on the unmodified base: rank 2r, alpha 2 alpha.
    doubled = 2 if spec in ("pissa", "olora") else 1
    assert plain["peft_type"] == "LORA" and "harness_spec" not in plain and plain["lora_alpha"] == ALPHA * doubled
    assert plain["r"] == (5 if "match" in spec else R) * doubled
    assert plain["use_dora"] == (spec == "dora") and plain["use_rslora"] == (spec == "rslora")  # DoRA: peft's own
    assert plain["init_lora_weights"] is True
    assert not (folder / "harness" / "adapter_config.json").exists()
    factored = json.loads((folder / "harness" / "harness_config.json").read_text())
    peft_own = spec.startswith("lora") or spec in ("dora", "rslora", "pissa", "olora")
    assert factored["r"] * doubled == plain["r"] and bool(factored.get("harness_spec")) == (not peft_own)
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_plain_lora_folder_loads_as_plain_lora(base, ids, saved):
    folder, _, expected = saved["linchain"]
    plain = load_adapter_model(copy.deepcopy(base), folder, plain=True)
    assert isinstance(first_factor(plain), torch.nn.Linear)
    assert torch.allclose(logits(plain, ids), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# python -m harness.export


def export(*args):
    from harness.export import main

    return main([str(a) for a in args])


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_export_writes_the_plain_lora_and_names_the_vllm_rank(base, ids, saved, tmp_path, capsys):
    from peft import PeftModel

    folder, _, expected = saved["linchain"]
    assert export(folder, tmp_path / "out", "--model", "tiny-random") == 0
    assert "--max-lora-rank 8" in capsys.readouterr().out  # r = 8, itself a value vLLM accepts
    plain = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out"))
    assert torch.allclose(logits(plain, ids), expected, rtol=1e-5, atol=1e-5)


def test_vllm_rank_is_the_smallest_accepted_value_at_or_above_r():
    from harness.export import vllm_rank

    assert [vllm_rank(r) for r in (1, 2, 8, 9, 300, 321, 512, 513)] == [1, 8, 8, 16, 320, 512, 512, None]


def test_merged_export_is_a_model_with_the_adapters_logits(saved, ids, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for spec in ("condlora", "mtlora:structure=icfm"):
        folder, _, expected = saved[spec]
        out = tmp_path / spec.replace(":", "_")
        assert export(folder, out, "--merged", "--model", "tiny-random") == 0
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(out)
        assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in tiny_random_model().parameters())
        assert torch.allclose(logits(merged, ids), expected, rtol=1e-5, atol=1e-5), spec
        assert AutoTokenizer.from_pretrained(out)("12+3")["input_ids"]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A Llama folder whose layers are wider than tiny-random's: the wrong base for its adapters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.models import tiny_tokenizer

    folder = tmp_path_factory.mktemp("other")
    config = LlamaConfig(**{**tiny_random_model().config.to_dict(), "hidden_size": 96, "intermediate_size": 160})
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _bad_inputs(saved, tmp_path, other_model):
    not_an_adapter = tmp_path / "empty"
    not_an_adapter.mkdir()
    (not_an_adapter / "config.json").write_text("{}")
    huge = tmp_path / "huge"
    huge.mkdir()
    plain = json.loads((saved["lora"][0] / "adapter_config.json").read_text())
    (huge / "adapter_config.json").write_text(json.dumps({**plain, "r": 600}))
    return {
        "neither": ([not_an_adapter, "--model", "tiny-random"], "neither adapter_config.json"),
        "wrong base": ([saved["linchain"][0], "--model", other_model], "pass the model it was trained on"),
        "wrong base, bias": ([saved[BIAS][0] / "harness", "--model", other_model], "bias=true"),
        "merged bias": ([saved[BIAS][0], "--merged", "--model", "tiny-random"], "bias=true cannot be merged"),
        "plain bias": ([saved[BIAS][0], "--model", "tiny-random"], "bias=true cannot be exported"),
        "r above vLLM": ([huge, "--vllm", "--model", "tiny-random"], "above every --max-lora-rank"),
        "no base named": ([saved["lora"][0]], "pass --model"),
    }


@pytest.mark.parametrize("case", ["neither", "wrong base", "wrong base, bias", "merged bias", "plain bias",
                                  "r above vLLM", "no base named"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(saved, tmp_path, other_model, capsys, case):
    args, problem = _bad_inputs(saved, tmp_path, other_model)[case]
    out = tmp_path / "out"
    capsys.readouterr()
    assert export(args[0], out, *args[1:]) == 2
    assert problem in one_error_line(capsys.readouterr().err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_export_refuses_an_existing_output_folder(saved, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert export(saved["lora"][0], tmp_path / "out", "--model", "tiny-random") == 2
    assert "already exists" in one_error_line(capsys.readouterr().err)
    assert list((tmp_path / "out").iterdir()) == []


def test_export_help_explains_both_forms_and_vllm():
    done = subprocess.run([sys.executable, "-m", "harness.export", "--help"], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0
    assert "--merged" in done.stdout and "max-lora-rank" in done.stdout and "bias=true" in done.stdout
