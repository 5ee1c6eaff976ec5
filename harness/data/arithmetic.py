"""The custom arithmetic generator: seeded, reproducible problems in the LLM-Adapters record schema.

A setting is written ``ops=+-*,digits=2,steps=1,form=expr,n=2000``:

- ``ops``: any of ``+ - * /`` (``/`` is integer division with no remainder);
- ``digits``: digits of each operand (1-6; a dividend is built as divisor x quotient, so it may be longer);
- ``steps``: operations per problem (1-5), applied left to right: ``(12 + 7) * 3``;
- ``form``: ``expr`` ("What is 12 + 7?"), ``word`` (a short story) or ``mixed`` (each problem either);
- ``n``: how many problems.

Three splits, disjoint by construction: which split a problem belongs to is a property of the
problem itself, not of the seed or the setting. A hash of its canonical form puts about 20% of
the space in ``test``, 10% in ``validation`` (for tuning) and the rest in ``train``, so no
training set of any setting contains a problem of any validation or test set.

The canonical form sorts the two operands of a commutative first step (``+`` and ``*``): ``7 + 12``
and ``12 + 7`` (as expressions or as stories) are one problem and fall in one split. Later steps
always apply an operator to the running result on the left (``(12 + 7) * 3``), so the generator
cannot write their commuted twin (``3 * (12 + 7)``) and they need no sorting; ``-`` and ``/`` do
not commute. The test share and the hash are those of the first version (which hashed the
problem as written, so the commuted twin of 9% of ``arithmetic_add_sub``'s test items was in
the default training data): a problem already in canonical order is test exactly when it was,
and 153 of that task's 200 test documents are unchanged. Subtraction never goes below zero.
"""

from __future__ import annotations

import hashlib
import operator
import random
from dataclasses import dataclass, fields

from harness.errors import UserError

OPS = "+-*/"
FORMS = ("expr", "word", "mixed")
# Fixed on purpose: changing them would move problems between splits (and change published test scores).
TEST_SHARE = 0.2  # hash buckets [0, 0.2) are test
VALIDATION_SHARE = 0.1  # [0.2, 0.3) validation, the rest train
SPLITS = ("train", "validation", "test")
COMMUTATIVE = frozenset("+*")

_NAMES = [("Tom", "he", "his"), ("Mia", "she", "her"), ("Ravi", "he", "his"), ("Lena", "she", "her"),
          ("Omar", "he", "his"), ("Yuki", "she", "her")]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards"]


@dataclass(frozen=True)
class ArithmeticSpec:
    """One generator setting; see the module docstring for the meaning of each field."""

    ops: str = "+-"
    digits: int = 2
    steps: int = 1
    form: str = "mixed"
    n: int = 2000

    def __post_init__(self):
        if not self.ops or any(op not in OPS for op in self.ops) or len(set(self.ops)) != len(self.ops):
            raise UserError(f"arithmetic: ops={self.ops!r} must be a non-empty set of {OPS!r} without repeats")
        if not 1 <= self.digits <= 6:
            raise UserError(f"arithmetic: digits={self.digits} is out of range (1-6)")
        if not 1 <= self.steps <= 5:
            raise UserError(f"arithmetic: steps={self.steps} is out of range (1-5)")
        if self.form not in FORMS:
            raise UserError(f"arithmetic: form={self.form!r} is unknown (one of {', '.join(FORMS)})")
        if not 1 <= self.n <= 1_000_000:
            raise UserError(f"arithmetic: n={self.n} is out of range (1-1000000)")

    def __str__(self) -> str:
        return f"ops={self.ops},digits={self.digits},steps={self.steps},form={self.form},n={self.n}"


DEFAULT_SPEC = ArithmeticSpec()  # two-digit + and -, one step, expressions and word problems


def parse_spec(text: str) -> ArithmeticSpec:
    """``"ops=+-*,digits=2"`` (or ``"arithmetic:ops=..."``) -> ArithmeticSpec; unknown or malformed options raise UserError."""
    if text.startswith("arithmetic"):
        text = text[len("arithmetic"):].lstrip(":")
    known = {f.name: f.type for f in fields(ArithmeticSpec)}
    values: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise UserError(f"arithmetic: cannot read option {part!r} (options: {', '.join(known)}; "
                            "e.g. arithmetic:ops=+-*,digits=2,n=2000)")
        if known[key] == "int":
            try:
                values[key] = int(value)
            except ValueError:
                raise UserError(f"arithmetic: {key}={value!r} is not an integer") from None
        else:
            values[key] = value.strip()
    return ArithmeticSpec(**values)


def problem_split(key: str) -> str:
    """The split a problem belongs to, from a hash of its canonical form (see :func:`canonical`)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < TEST_SHARE:
        return "test"
    return "validation" if bucket < TEST_SHARE + VALIDATION_SHARE else "train"


def generate(spec: ArithmeticSpec | str = DEFAULT_SPEC, split: str = "train", seed: int = 0) -> list[dict]:
    """``spec.n`` distinct problems of ``split``, the same for the same (spec, split, seed)."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if split not in SPLITS:
        raise UserError(f"arithmetic: unknown split {split!r} (one of {', '.join(SPLITS)})")
    rng = random.Random(f"{seed}|{split}|{spec}")
    records, seen = [], set()
    attempts = 0
    max_attempts = 50 * spec.n + 2000
    while len(records) < spec.n:
        attempts += 1
        if attempts > max_attempts:
            raise UserError(f"arithmetic: only {len(records)} distinct {split} problems found for {spec}; "
                            "ask for fewer (smaller n) or a larger space (more digits, ops or steps)")
        operands, ops, results = _draw(rng, spec)
        key = canonical(operands, ops)
        if key in seen or problem_split(key) != split:
            continue
        seen.add(key)
        form = spec.form if spec.form != "mixed" else rng.choice(("expr", "word"))
        instruction = _expression_question(operands, ops) if form == "expr" else _word_problem(rng, operands, ops)
        records.append({
            "instruction": instruction,
            "input": "",
            "output": _worked_answer(operands, ops, results),
            "answer": str(results[-1]),
        })
    return records


def _operand(rng: random.Random, digits: int, nonzero: bool = False) -> int:
    low = 10 ** (digits - 1) if digits > 1 else (1 if nonzero else 0)
    return rng.randint(low, 10**digits - 1)


def _draw(rng: random.Random, spec: ArithmeticSpec) -> tuple[list[int], list[str], list[int]]:
    """Operands, operators and the running results of one problem."""
    ops = [rng.choice(spec.ops) for _ in range(spec.steps)]
    if ops[0] == "/":
        divisor, quotient = _operand(rng, spec.digits, nonzero=True), _operand(rng, spec.digits)
        operands, value = [divisor * quotient, divisor], quotient
    else:
        a, b = _operand(rng, spec.digits), _operand(rng, spec.digits)
        if ops[0] == "-" and b > a:
            a, b = b, a
        operands, value = [a, b], _apply(a, ops[0], b)
    results = [value]
    for i in range(1, spec.steps):
        op, b = ops[i], _operand(rng, spec.digits, nonzero=ops[i] == "/")
        if op == "-" and b > value:
            op = "+"
        if op == "/":
            divisors = [d for d in range(max(2, 10 ** (spec.digits - 1)), 10**spec.digits) if value % d == 0]
            if value == 0 or not divisors:
                op = "+"
            else:
                b = rng.choice(divisors)
        ops[i] = op
        operands.append(b)
        value = _apply(value, op, b)
        results.append(value)
    return operands, ops, results


def _apply(a: int, op: str, b: int) -> int:
    return {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}[op](a, b)


def canonical(operands: list[int], ops: list[str]) -> str:
    """The problem's identity for splitting: ``((a op b) op c)`` with a commutative first step's operands sorted.

    Commuted twins (``7 + 12``, ``12 + 7``) get one key, so they cannot fall in different splits.
    """
    if ops[0] in COMMUTATIVE and operands[0] > operands[1]:
        operands = [operands[1], operands[0], *operands[2:]]
    text = str(operands[0])
    for op, b in zip(ops, operands[1:]):
        text = f"({text}{op}{b})"
    return text


def _expression(operands: list[int], ops: list[str]) -> str:
    text = str(operands[0])
    for i, (op, b) in enumerate(zip(ops, operands[1:])):
        text = f"{text} {op} {b}" if i == 0 else f"({text}) {op} {b}"
    return text


def _expression_question(operands: list[int], ops: list[str]) -> str:
    return f"What is {_expression(operands, ops)}?"


def _worked_answer(operands: list[int], ops: list[str], results: list[int]) -> str:
    """The response taught in training: each step's equation; its last number is the answer."""
    steps, left = [], operands[0]
    for op, b, value in zip(ops, operands[1:], results):
        steps.append(f"{left} {op} {b} = {value}")
        left = value
    return ", ".join(steps)


def _word_problem(rng: random.Random, operands: list[int], ops: list[str]) -> str:
    name, pronoun, possessive = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    subject = pronoun.capitalize()
    sentences = [f"{name} has {operands[0]} {item}."]
    for op, b in zip(ops, operands[1:]):
        sentences.append({
            "+": f"{subject} gets {b} more {item}.",
            "-": f"{subject} gives away {b} {item}.",
            "*": f"Then {possessive} number of {item} becomes {b} times as large.",
            "/": f"{subject} shares them equally among {b} friends and keeps one share.",
        }[op])
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences)
