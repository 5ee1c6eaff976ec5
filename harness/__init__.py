"""A benchmark and ablation harness for LoRA-family adapters.

The pipeline, one module each: data -> models -> adapters -> train -> evaluate ->
track -> report. Importing the package loads no model and touches no network.
"""

__version__ = "0.1.0"
