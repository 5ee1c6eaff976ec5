"""Method specs: the strings users type to name an adapter, e.g. ``linchain:r=8,widths=8-16-8``.

The parsed :class:`AdapterSpec` is the one description of a method: the peft config
stores its canonical string and parses it again on load, labels come from it, and
the tables below hold every method's options and defaults. This module imports
neither torch nor peft, so the configuration and ``--help`` can use it cheaply.

Grammar: ``METHOD[:KEY=VALUE[,KEY=VALUE]...]``. Lists inside a value use ``-`` for
widths (``widths=8-16-8``) and ``+`` for target modules (``targets=q_proj+v_proj``).
``match`` takes a whole spec as its value, so it must come last:
``lora:match=linchain:r=8,widths=8-16-8``.

Every method accepts the common options ``r``, ``alpha``, ``dropout``, ``targets``
(they come from the run and can be overridden per method) and ``lr`` (a training
override the adapter itself ignores). Methods add their own:

======== ===========================================================================
lora      ``match=<spec>``: the rank whose trainable-parameter count is nearest that
          spec's (chosen once the model's layer shapes are known)
moslora   ``init``: kaiming (default) | orthogonal | identity; ``freeze_middle``; ``bias``
linchain  ``n`` (default 3), ``widths`` (r-...-r, n+1 numbers), ``init``, ``freeze_middle``, ``bias``
mtlora    ``structure``: shim (default) | icfm | ctcm | dtsm; ``init``; ``freeze_middle``
condlora  ``form``: rowspace (default) | authors
dora      peft's DoRA (``use_dora``): a learned magnitude per output row on top of LoRA
rslora    peft's rsLoRA (``use_rslora``): LoRA scaled by alpha / sqrt(r) instead of alpha / r
pissa     peft's PiSSA (``init_lora_weights="pissa"``): A and B start at the top-r singular part of W0,
          which is taken out of the base weight (the base becomes the residual)
olora     peft's OLoRA (``init_lora_weights="olora"``): A and B start at the first r columns of W0's
          QR decomposition, likewise taken out of the base weight; nn.Linear layers only
======== ===========================================================================

``targets=auto`` (the default) means the architecture's default modules, resolved once the model is
known (:func:`harness.adapters.api.resolve_targets`; the table is ``harness.models.ARCHITECTURES``):
q, k, v, up and down projections, in that architecture's names (docs/architectures.md). Until then a
spec's :attr:`AdapterSpec.targets` is None.

``freeze_middle=true`` keeps the middle matrices at their initial values (the
"init-only" control: only A and B train). ``bias=true`` gives every chain matrix a
bias, as the LinChain authors' released code does (torch's ``nn.Linear``); such an
adapter is affine, so it cannot be merged or exported as a plain LoRA.

Parsing checks everything that can be checked without a model; shape checks
against a model live in :func:`harness.adapters.api.validate_against_model`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from harness.errors import UserError

METHODS = ("lora", "moslora", "linchain", "mtlora", "condlora", "dora", "rslora", "pissa", "olora")
# peft's own LoRA variants: each is one LoraConfig option (harness.adapters.api.PEFT_VARIANTS).
PEFT_VARIANT_METHODS = ("dora", "rslora", "pissa", "olora")
# Initialisations that take s B0 A0 out of W0 (the base layer then holds the residual): the update to W0 is
# s (B A - B0 A0), exported through peft's conversion (rank 2r) and measured so by the diagnostics.
MOVES_W0 = ("pissa", "olora")
# The attribute on a PiSSA/OLoRA layer that holds adapter -> (B0, A0), the factors peft took out of W0: set by
# harness.adapters.api, read by harness.diagnostics.spectra (named here, where both can import it without torch).
INITIAL_FACTORS_ATTR = "_harness_initial"
INITS = ("kaiming", "orthogonal", "identity")
STRUCTURES = ("shim", "icfm", "ctcm", "dtsm")
CONDLORA_FORMS = ("rowspace", "authors")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the LinChain paper's, Llama names
AUTO_TARGETS = "auto"  # targets=auto: the architecture's defaults (DEFAULT_TARGETS on Llama-style models)
COMMON_OPTIONS = ("r", "alpha", "dropout", "targets", "lr")
METHOD_OPTIONS = {
    "lora": ("match",),
    "moslora": ("init", "freeze_middle", "bias"),
    "linchain": ("n", "widths", "init", "freeze_middle", "bias"),
    "mtlora": ("structure", "init", "freeze_middle"),
    "condlora": ("form",),
    "dora": (),
    "rslora": (),
    "pissa": (),
    "olora": (),
}
# Defaults of the method options; the common options' defaults are parse_spec's keyword arguments.
OPTION_DEFAULTS = {"n": 3, "init": "kaiming", "structure": "shim", "form": "rowspace",
                   "freeze_middle": False, "bias": False}
# Why rowspace is CondLoRA's default: it is the one form that fits every layer shape, and the default
# targets (k, v, up, down) are not square; the authors' form (Kim et al. 2024) applies to square layers only.


def _chain(matrices: Sequence) -> Any:
    t = matrices[0]
    for m in matrices[1:]:
        t = m @ t
    return t


@dataclass(frozen=True)
class MiddleProduct:
    """How a method's middle matrices form T (r x r): the one place chain, gram and sum are told apart.

    ``combine`` works on any matrices with ``@``, ``+`` and ``.T`` (torch tensors in the adapter).
    ``zero_at_identity`` lists the matrices that start at zero under ``init=identity``; the others start
    at the (rectangular) identity, so T starts at I.
    """

    formula: str
    shapes: Callable[[int, tuple[int, ...] | None], tuple[tuple[int, int], ...]]
    combine: Callable[[Sequence], Any]
    zero_at_identity: tuple[int, ...] = ()


MIDDLE_PRODUCTS = {
    "chain": MiddleProduct("W_n ... W_2 W_1", lambda r, w: tuple((w[i + 1], w[i]) for i in range(len(w) - 1)),
                           _chain),
    "gram": MiddleProduct("C C^T", lambda r, w: ((r, r),), lambda m: m[0] @ m[0].T),
    "sum": MiddleProduct("C + D", lambda r, w: ((r, r), (r, r)), lambda m: m[0] + m[1], zero_at_identity=(1,)),
}
# MoSLoRA and MTLoRA-SHIM are a chain of one r x r matrix, LinChain-2 and MTLoRA-CTCM a chain of two.
STRUCTURE_PRODUCTS = {"shim": "chain", "icfm": "gram", "ctcm": "chain", "dtsm": "sum"}
STRUCTURE_WIDTHS = {"shim": 1, "ctcm": 2}  # matrices in the chain, for the chain structures


@dataclass(frozen=True)
class AdapterSpec:
    """A fully parsed adapter method: what to build, independent of any model.

    ``r`` is None only for ``lora:match=...`` before :func:`harness.adapters.api.resolve_match` has
    chosen it from the model's layer shapes; ``match`` is then the spec whose parameter count it matches.
    ``targets`` is None for ``targets=auto`` until :func:`harness.adapters.api.resolve_targets` has put
    in the architecture's defaults.
    """

    method: str
    r: int | None = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # None: the architecture's defaults, not yet resolved
    init: str = "kaiming"
    structure: str | None = None
    chain_widths: tuple[int, ...] | None = None
    lr: float | None = None
    freeze_middle: bool = False
    bias: bool = False
    form: str | None = None
    match: AdapterSpec | None = None
    text: str = field(default="", compare=False)

    @property
    def middle_product(self) -> str | None:
        """How the middle matrices combine into T: a key of :data:`MIDDLE_PRODUCTS`, or None (no middle)."""
        if self.method in ("moslora", "linchain"):
            return "chain"
        if self.method == "mtlora":
            return STRUCTURE_PRODUCTS[self.structure]
        return None

    @property
    def middle(self) -> MiddleProduct | None:
        product = self.middle_product
        return MIDDLE_PRODUCTS[product] if product else None

    @property
    def middle_shapes(self) -> tuple[tuple[int, int], ...]:
        """Shapes of the middle matrices, in the order they are stored (and multiplied, for a chain)."""
        return self.middle.shapes(self.r, self.chain_widths) if self.middle else ()

    @property
    def name(self) -> str:
        """The method and its structure, without the options: ``linchain-3``, ``mtlora-icfm``, ``linchain-8-16-8``."""
        if self.method == "linchain":
            widths = self.chain_widths
            if all(w == self.r for w in widths):
                return f"linchain-{len(widths) - 1}"
            return "linchain-" + "-".join(map(str, widths))
        if self.method == "mtlora":
            return f"mtlora-{self.structure}"
        return self.method

    @property
    def label(self) -> str:
        """The short name in tables, plots and MLflow: :attr:`name` plus every option off its default.

        ``moslora-orthogonal``, ``linchain-3-bias-frozen``, ``condlora-authors``, and for a matched LoRA the
        rank it got: ``lora-r18-match-linchain-8-16-8`` (``lora-match-...`` before the rank is chosen).
        """
        if self.match is not None:
            rank = "" if self.r is None else f"-r{self.r}"
            return f"lora{rank}-match-{self.match.label}"
        parts = [self.name]
        if self.middle_product and self.init != OPTION_DEFAULTS["init"]:
            parts.append(self.init)
        if self.bias:
            parts.append("bias")
        if self.freeze_middle:
            parts.append("frozen")
        if self.form not in (None, OPTION_DEFAULTS["form"]):
            parts.append(self.form)
        return "-".join(parts)

    def canonical(self) -> str:
        """A spec string that parses back to this exact spec (every option spelled out)."""
        opts = [] if self.r is None else [f"r={self.r}"]
        targets = AUTO_TARGETS if self.targets is None else "+".join(self.targets)
        opts += [f"alpha={_fmt(self.alpha)}", f"dropout={_fmt(self.dropout)}", f"targets={targets}"]
        if self.method == "linchain":
            opts.append("widths=" + "-".join(map(str, self.chain_widths)))
        if self.method == "mtlora":
            opts.append(f"structure={self.structure}")
        if self.middle_product is not None:
            opts.append(f"init={self.init}")
            opts.append(f"freeze_middle={str(self.freeze_middle).lower()}")
        if self.method in ("moslora", "linchain"):
            opts.append(f"bias={str(self.bias).lower()}")
        if self.form is not None:
            opts.append(f"form={self.form}")
        if self.lr is not None:
            opts.append(f"lr={_fmt(self.lr)}")
        if self.match is not None:
            opts.append(f"match={self.match.canonical()}")  # last: its value is a spec with commas of its own
        return f"{self.method}:" + ",".join(opts)


def _fmt(x: float) -> str:
    return f"{x:g}"


def parse_spec(
    text: str,
    *,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] | str | None = AUTO_TARGETS,
) -> AdapterSpec:
    """Parse and check a method spec; keyword arguments are the run's common options, the spec overrides them.

    Raises :class:`UserError` with one line naming the problem and the accepted values.
    """
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"empty adapter spec; choose one of: {', '.join(METHODS)}")
    text = text.strip()
    method, colon, rest = text.partition(":")
    method = method.strip().lower()
    if method not in METHODS:
        raise UserError(f"unknown adapter method {method!r} in spec {text!r}; choose one of: {', '.join(METHODS)}")
    if colon and not rest.strip():
        raise UserError(f"malformed spec {text!r}: nothing after ':'; write e.g. {method} or {method}:r=8")
    options = _options(method, rest, text)
    common = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}

    match = None
    if "match" in options:
        match = parse_spec(options["match"], **common)
        if match.match is not None:
            raise UserError(f"match takes a spec without a match of its own (got {options['match']!r}) "
                            f"in spec {text!r}")
    # A matched LoRA's rank is chosen from the model; an r in the spec (as in a canonical string) is checked then.
    if "r" in options or match is None:
        r_val = _positive_int("r", options.get("r", r), text)
    else:
        r_val = None
    alpha_val = _number("alpha", options.get("alpha", alpha), text, low=0.0, low_open=True)
    dropout_val = _number("dropout", options.get("dropout", dropout), text, low=0.0, high=1.0, high_open=True)
    target_val = _targets(options.get("targets", targets), text)
    lr_val = _number("lr", options["lr"], text, low=0.0, low_open=True) if "lr" in options else None
    init = _choice("init", options, INITS, text)
    freeze_middle = _boolean("freeze_middle", options, text)
    bias = _boolean("bias", options, text)

    structure = widths = form = None
    if method == "moslora":
        widths = (r_val, r_val)
    elif method == "linchain":
        widths = _chain_widths(options, r_val, text)
    elif method == "mtlora":
        structure = _choice("structure", options, STRUCTURES, text, what="MTLoRA structure")
        if structure in STRUCTURE_WIDTHS:
            widths = (r_val,) * (STRUCTURE_WIDTHS[structure] + 1)
    elif method == "condlora":
        form = _choice("form", options, CONDLORA_FORMS, text, what="CondLoRA form")

    return AdapterSpec(method=method, r=r_val, alpha=alpha_val, dropout=dropout_val, targets=target_val,
                       init=init, structure=structure, chain_widths=widths, lr=lr_val, freeze_middle=freeze_middle,
                       bias=bias, form=form, match=match, text=text)


def _options(method: str, rest: str, text: str) -> dict[str, str]:
    """The ``key=value`` options after the colon; ``match=`` takes the rest of the string as its value."""
    accepted = COMMON_OPTIONS + METHOD_OPTIONS[method]
    options: dict[str, str] = {}
    items = rest.split(",") if rest.strip() else []
    for i, item in enumerate(items):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key == "match" and eq:
            value = ",".join([value] + items[i + 1:]).strip()
        if not eq or not key or not value:
            raise UserError(f"malformed option {item.strip()!r} in spec {text!r}: options are key=value pairs "
                            "separated by commas, e.g. linchain:n=5,r=8")
        if key not in accepted:
            raise UserError(f"unknown option {key!r} for {method} in spec {text!r}; "
                            f"{method} accepts: {', '.join(accepted)}")
        if key in options:
            raise UserError(f"option {key!r} given twice in spec {text!r}")
        options[key] = value
        if key == "match":
            break
    return options


def _choice(key: str, options: dict[str, str], choices: tuple[str, ...], text: str, what: str | None = None) -> str:
    value = options.get(key, OPTION_DEFAULTS[key]).lower()
    if value not in choices:
        raise UserError(f"unknown {what or key} {value!r} in spec {text!r}; choose one of: {', '.join(choices)}")
    return value


def _boolean(key: str, options: dict[str, str], text: str) -> bool:
    if key not in options:
        return OPTION_DEFAULTS[key]
    value = options[key].lower()
    if value not in ("true", "false"):
        raise UserError(f"{key} must be true or false (got {options[key]!r}) in spec {text!r}")
    return value == "true"


def _chain_widths(options: dict[str, str], r: int, text: str) -> tuple[int, ...]:
    n = None
    if "n" in options:
        try:
            n = int(options["n"])
        except ValueError:
            n = None
        if n is None or n < 1:
            raise UserError(f"chain length n must be an integer >= 1 (got {options['n']!r}) in spec {text!r}")
    if "widths" in options:
        parts = options["widths"].split("-")
        try:
            widths = tuple(int(p) for p in parts)
        except ValueError:
            raise UserError(f"widths must be integers joined by '-', e.g. widths={r}-{2 * r}-{r} "
                            f"(got {options['widths']!r}) in spec {text!r}") from None
        if len(widths) < 2:
            raise UserError(f"widths needs at least two numbers, r-...-r, e.g. widths={r}-{r} (got "
                            f"{options['widths']!r}) in spec {text!r}")
        if widths[0] != r or widths[-1] != r:
            raise UserError(f"widths must start and end at r={r}, e.g. widths={r}-{2 * r}-{r} "
                            f"(got {options['widths']!r}) in spec {text!r}")
        if any(w <= 0 for w in widths):
            raise UserError(f"every chain width must be a positive integer (got {options['widths']!r}) in spec {text!r}")
        if n is not None and n != len(widths) - 1:
            raise UserError(f"n={n} disagrees with widths={options['widths']} ({len(widths) - 1} matrices) "
                            f"in spec {text!r}")
        return widths
    return (r,) * ((n if n is not None else OPTION_DEFAULTS["n"]) + 1)


def _positive_int(name: str, value, text: str) -> int:
    try:
        as_int = int(value)
        if str(value).strip() not in (str(as_int), f"{as_int}.0") and not isinstance(value, int):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a positive integer (got {value!r}) in spec {text!r}") from None
    if as_int <= 0:
        raise UserError(f"{name} must be a positive integer (got {value!r}) in spec {text!r}")
    return as_int


def _number(name: str, value, text: str, low=None, high=None, low_open=False, high_open=False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number (got {value!r}) in spec {text!r}") from None
    bad = (not math.isfinite(x) or (low is not None and (x < low or (low_open and x == low)))
           or (high is not None and (x > high or (high_open and x == high))))
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + _fmt(low)
        hi = "" if high is None else _fmt(high) + (")" if high_open else "]")
        rng = f"{lo}, {hi or 'inf)'}" if lo else f"(-inf, {hi}"
        raise UserError(f"{name} must be in {rng} (got {value!r}) in spec {text!r}")
    return x


def _targets(value, text: str) -> tuple[str, ...] | None:
    """The target module names; None for ``auto`` (the architecture's defaults, resolved with the model)."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [t for t in value.replace(",", "+").split("+")]
    else:
        items = list(value)
    items = [t.strip() for t in items]
    if not items or any(not t for t in items):
        raise UserError(f"targets must name module(s), e.g. targets=q_proj+v_proj (got {value!r}) in spec {text!r}")
    if AUTO_TARGETS in items:
        if len(items) > 1:
            raise UserError(f"targets=auto stands alone (the architecture's defaults); name modules instead "
                            f"(got {value!r}) in spec {text!r}")
        return None
    return tuple(dict.fromkeys(items))


def spec_options(text: str) -> tuple[str, dict[str, str]]:
    """A spec's method and its ``key=value`` options as written (``match=`` keeps its whole spec), unchecked
    beyond the grammar: what a study needs to lay out a spec as a point of its space."""
    method, _, rest = text.strip().partition(":")
    method = method.strip().lower()
    if method not in METHODS:
        raise UserError(f"unknown adapter method {method!r} in spec {text!r}; choose one of: {', '.join(METHODS)}")
    return method, _options(method, rest, text)


def without_options(text: str, keys: Iterable[str]) -> str:
    """A spec's text without the named options; the others stay as written, in their order.

    Read with the spec grammar (:func:`spec_options`), so ``match=`` keeps its whole spec, commas and
    options of its own included: ``without_options("lora:r=8,lr=1e-3,match=linchain:r=8,widths=8-16-8,lr=1e-3",
    ["lr"])`` is ``lora:r=8,match=linchain:r=8,widths=8-16-8,lr=1e-3``. An unknown method or option raises
    :class:`UserError`, as parsing does.
    """
    drop = {keys} if isinstance(keys, str) else set(keys)
    method, options = spec_options(text)
    kept = [f"{key}={value}" for key, value in options.items() if key not in drop]
    return method + (":" + ",".join(kept) if kept else "")


# ----------------------------------------------------------------------------------------------------------
# The reference: which of a run's methods stands for LoRA


REFERENCE_METHOD = "lora"  # every gain and every claim is measured against the method that stands for LoRA


def method_part(name: str) -> str:
    """The method of a spec text or a label as written: a spec text's text before its first ':'
    (``lora:r=8`` -> ``lora``, ``lora:match=linchain`` -> ``lora``), a label's text before its first '-'
    (``linchain-3`` -> ``linchain``, ``lora-r18-match-linchain-8-16-8`` -> ``lora``). No method's name holds
    a '-' or a ':', so the two never disagree."""
    return name.split(":", 1)[0].split("-", 1)[0].strip().lower()  # spec parsing ignores the method's case


def reference_name(names: Sequence[str], methods: Iterable[str] | None = None) -> str | None:
    """Which of a run's methods stands for plain LoRA: the name ``lora`` itself if present, else the first name
    whose method is ``lora`` (None if there is none). This is the one rule of a run's summary, its diagnostics
    and ``harness.compare``, so all three compare with the same row.

    ``names`` are the methods' spec texts or labels, in the run's order. ``methods`` gives each name's method,
    in the same order; without it a name's method is its :func:`method_part`. A matched LoRA is a LoRA: it is
    the reference when it is the only LoRA of the run (``lora-r18-match-linchain-8-16-8`` beside
    ``linchain-8-16-8``), and plain ``lora`` is preferred when both are there.

    The fair study's :func:`ablations.fair.reference_of` has a rule of its own: a method is compared with the
    ``lora`` point sharing the most of its options, and a ``lora:match=`` point is never a reference.
    """
    if REFERENCE_METHOD in names:
        return REFERENCE_METHOD
    methods = map(method_part, names) if methods is None else methods
    return next((name for name, method in zip(names, methods) if method == REFERENCE_METHOD), None)
