"""Every `python -m ...` command the README and docs show parses as written: its module imports and its
command line is accepted by that module's own argparse parser (a dry run: parsing stops before any work).

A renamed flag, a removed option or a moved module breaks a copied command; this finds it."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md",
             *sorted((ROOT / "results" / "findings").glob("*/README.md")), ROOT / "harness" / "tasks" / "README.md"]
# a module name written as a pattern in prose ("python -m benchmarks.bench_X"), not a command
PATTERN_NAMES = re.compile(r"_X$|_$")


def _code_blocks(text: str) -> list[str]:
    lines, inside, out = text.splitlines(), False, []
    for line in lines:
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if inside:
            out.append(line)
    return out


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for each `python -m` command in a code block (inline spans in prose are often fragments,
    such as "`python -m harness.evaluate --adapter`", and are not checked)."""
    found = []
    for doc in DOCUMENTS:
        text = doc.read_text(encoding="utf-8")
        joined = re.sub(r"\\\n\s*", " ", "\n".join(_code_blocks(text)))  # backslash continuations
        candidates = [line.split(" #")[0].strip() for line in joined.splitlines()]
        for command in candidates:
            command = command.strip()
            if not command.startswith("python -m "):
                continue
            command = re.sub(r"<[^>]+>", "PLACEHOLDER", command)  # results/<run>: any name parses the same
            if any(mark in command for mark in ("...", "|", "$", "[")):
                continue  # an elision or a shell construct, not a runnable line
            found.append((doc.relative_to(ROOT).as_posix(), command))
    return sorted(set(found))


COMMANDS = documented_commands()


class Parsed(Exception):
    """Raised from inside parse_args once the command line was accepted: nothing runs after parsing."""


def test_the_documents_show_commands_of_every_entry_point():
    modules = {shlex.split(c)[2] for _, c in COMMANDS}
    assert len(COMMANDS) >= 30 and {"harness.run", "ablations.study", "harness.compare", "harness.evaluate", "harness.export",
            "harness.equivalence", "harness.adapters", "ablations.recompute"} <= modules


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_a_documented_command_parses_as_written(where, command, monkeypatch):
    words = shlex.split(command)
    module_name, argv = words[2], words[3:]
    if PATTERN_NAMES.search(module_name):
        pytest.skip(f"{module_name} names a pattern, not a module")
    module = importlib.import_module(module_name if module_name.endswith("__main__") or not _is_package(module_name)
                                     else module_name + ".__main__")
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # exits 2 on a flag the parser does not know
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module_name, *argv])
    main = module.main
    with pytest.raises((Parsed, SystemExit)) as caught:
        try:
            main(argv)
        except TypeError as err:  # a main() that reads sys.argv itself
            if "positional argument" not in str(err):
                raise
            main()
    if isinstance(caught.value, SystemExit) and caught.value.code not in (0, None):  # --help exits 0
        pytest.fail(f"{where}: `{command}` does not parse (exit {caught.value.code})")


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None
