"""Method specs: the strings users type to name an adapter, e.g. ``linchain:r=8,widths=8-16-8``.

Grammar: ``METHOD[:KEY=VALUE[,KEY=VALUE]...]``. Lists inside a value use ``-`` for
widths (``widths=8-16-8``) and ``+`` for target modules (``targets=q_proj+v_proj``).

Every method accepts the common options ``r``, ``alpha``, ``dropout``, ``targets``
(they come from the run and can be overridden per method) and ``lr`` (a training
override the adapter itself ignores). Methods add their own:

======== =====================================================================
lora      (none)
moslora   ``init``: kaiming (default) | orthogonal | identity
linchain  ``n`` (default 3), ``widths`` (r-...-r, n+1 numbers), ``init``
mtlora    ``structure``: shim (default) | icfm | ctcm | dtsm; ``init``
condlora  (none)
======== =====================================================================

Parsing checks everything that can be checked without a model; shape checks
against a model live in :func:`harness.adapters.api.validate_against_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from harness.errors import UserError

METHODS = ("lora", "moslora", "linchain", "mtlora", "condlora")
INITS = ("kaiming", "orthogonal", "identity")
STRUCTURES = ("shim", "icfm", "ctcm", "dtsm")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the LinChain paper's
COMMON_OPTIONS = ("r", "alpha", "dropout", "targets", "lr")
METHOD_OPTIONS = {
    "lora": (),
    "moslora": ("init",),
    "linchain": ("n", "widths", "init"),
    "mtlora": ("structure", "init"),
    "condlora": (),
}
DEFAULT_CHAIN_LENGTH = 3


@dataclass(frozen=True)
class AdapterSpec:
    """A fully resolved adapter method: what to build, independent of any model.

    ``middle_product`` and ``chain_widths`` describe the matrices between A and B:
    ``chain`` multiplies them in order (MoSLoRA, LinChain, MTLoRA SHIM and CTCM),
    ``gram`` is C C^T (MTLoRA ICFM), ``sum`` is C + D (MTLoRA DTSM).
    """

    method: str
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    init: str = "kaiming"
    structure: str | None = None
    chain_widths: tuple[int, ...] | None = None
    lr: float | None = None
    text: str = field(default="", compare=False)

    @property
    def middle_product(self) -> str | None:
        """How the middle matrices combine into T: ``chain``, ``gram``, ``sum``, or None (no middle)."""
        if self.method in ("moslora", "linchain"):
            return "chain"
        if self.method == "mtlora":
            return {"shim": "chain", "ctcm": "chain", "icfm": "gram", "dtsm": "sum"}[self.structure]
        return None

    @property
    def middle_shapes(self) -> tuple[tuple[int, int], ...]:
        """Shapes of the middle matrices, in the order they are stored."""
        product = self.middle_product
        if product == "chain":
            widths = self.chain_widths
            return tuple((widths[i + 1], widths[i]) for i in range(len(widths) - 1))
        if product == "gram":
            return ((self.r, self.r),)
        if product == "sum":
            return ((self.r, self.r), (self.r, self.r))
        return ()

    @property
    def name(self) -> str:
        """A short label for tables and plots, e.g. ``linchain-3``, ``mtlora-icfm``, ``linchain-8-16-8``."""
        if self.method == "linchain":
            widths = self.chain_widths
            if all(w == self.r for w in widths):
                return f"linchain-{len(widths) - 1}"
            return "linchain-" + "-".join(map(str, widths))
        if self.method == "mtlora":
            return f"mtlora-{self.structure}"
        return self.method

    def canonical(self) -> str:
        """A spec string that parses back to this exact spec (every option spelled out)."""
        opts = [f"r={self.r}", f"alpha={_fmt(self.alpha)}", f"dropout={_fmt(self.dropout)}",
                "targets=" + "+".join(self.targets)]
        if self.method == "linchain":
            opts.append("widths=" + "-".join(map(str, self.chain_widths)))
        if self.method == "mtlora":
            opts.append(f"structure={self.structure}")
        if self.middle_product is not None:
            opts.append(f"init={self.init}")
        if self.lr is not None:
            opts.append(f"lr={_fmt(self.lr)}")
        return f"{self.method}:" + ",".join(opts)


def _fmt(x: float) -> str:
    return f"{x:g}"


def parse_spec(
    text: str,
    *,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] | str = DEFAULT_TARGETS,
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
    accepted = COMMON_OPTIONS + METHOD_OPTIONS[method]
    options: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key or not value:
                raise UserError(f"malformed option {item.strip()!r} in spec {text!r}: options are key=value pairs "
                                "separated by commas, e.g. linchain:n=5,r=8")
            if key not in accepted:
                raise UserError(f"unknown option {key!r} for {method} in spec {text!r}; "
                                f"{method} accepts: {', '.join(accepted)}")
            if key in options:
                raise UserError(f"option {key!r} given twice in spec {text!r}")
            options[key] = value
    elif colon:
        raise UserError(f"malformed spec {text!r}: nothing after ':'; write e.g. {method} or {method}:r=8")

    r_val = _positive_int("r", options.get("r", r), text)
    alpha_val = _number("alpha", options.get("alpha", alpha), text, low=0.0, low_open=True)
    dropout_val = _number("dropout", options.get("dropout", dropout), text, low=0.0, high=1.0, high_open=True)
    target_val = _targets(options.get("targets", targets), text)
    lr_val = _number("lr", options["lr"], text, low=0.0, low_open=True) if "lr" in options else None

    init = options.get("init", "kaiming").lower()
    if init not in INITS:
        raise UserError(f"unknown init {init!r} in spec {text!r}; choose one of: {', '.join(INITS)}")

    structure = None
    widths = None
    if method == "moslora":
        widths = (r_val, r_val)
    elif method == "linchain":
        widths = _chain_widths(options, r_val, text)
    elif method == "mtlora":
        structure = options.get("structure", "shim").lower()
        if structure not in STRUCTURES:
            raise UserError(f"unknown MTLoRA structure {structure!r} in spec {text!r}; "
                            f"choose one of: {', '.join(STRUCTURES)}")
        # SHIM is a chain of one r x r matrix (MoSLoRA's class), CTCM a chain of two (LinChain-2's).
        widths = {"shim": (r_val, r_val), "ctcm": (r_val, r_val, r_val)}.get(structure)

    return AdapterSpec(method=method, r=r_val, alpha=alpha_val, dropout=dropout_val, targets=target_val,
                       init=init, structure=structure, chain_widths=widths, lr=lr_val, text=text)


def with_overrides(spec: AdapterSpec, **changes) -> AdapterSpec:
    """A copy of ``spec`` with fields replaced (used by ablations to vary one axis)."""
    return replace(spec, **changes)


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
    return (r,) * ((n if n is not None else DEFAULT_CHAIN_LENGTH) + 1)


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
    bad = (x != x or (low is not None and (x < low or (low_open and x == low)))
           or (high is not None and (x > high or (high_open and x == high))))
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + _fmt(low)
        hi = "" if high is None else _fmt(high) + (")" if high_open else "]")
        rng = f"{lo}, {hi or 'inf)'}" if lo else f"(-inf, {hi}"
        raise UserError(f"{name} must be in {rng} (got {value!r}) in spec {text!r}")
    return x


def _targets(value, text: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [t for t in value.replace(",", "+").split("+")]
    else:
        items = list(value)
    items = [t.strip() for t in items]
    if not items or any(not t for t in items):
        raise UserError(f"targets must name module(s), e.g. targets=q_proj+v_proj (got {value!r}) in spec {text!r}")
    return tuple(dict.fromkeys(items))
