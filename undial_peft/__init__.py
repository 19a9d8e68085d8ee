"""undial_peft: make a deployed LLM forget data by attaching small LoRA adapters (UNDIAL).

>>> from undial_peft import forget, attach, UndialConfig  # doctest: +SKIP
>>> adapter = forget("default", "forget.jsonl", "adapters/req-001", config=UndialConfig(beta=10))  # doctest: +SKIP
>>> model = attach("default", [adapter])  # doctest: +SKIP

The package is laid out by concern: ``training/`` (config, losses, trainer, stopping, ``forget``),
``deploy/`` (manifest, stacks, exports), ``evals/`` (metrics, reports, attacks), ``data/`` (readers,
encoding, named splits) and ``bench/``. The names below are the public API; each is imported on
first use, so ``undial-peft --help`` and the error types load without torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "forget": "undial_peft.training.forget",
    "preview_keys": "undial_peft.training.forget",
    "UndialConfig": "undial_peft.training.config",
    "UndialTrainer": "undial_peft.training.trainer",
    "undial_loss": "undial_peft.training.loss",
    "undial_loss_from_hidden": "undial_peft.training.loss",
    "load_model": "undial_peft.models",
    "attach": "undial_peft.deploy.stack",
    "export_stack": "undial_peft.deploy.stack",
    "merge_stack": "undial_peft.deploy.stack",
    "export_gguf": "undial_peft.deploy.gguf_export",
    "check_vllm": "undial_peft.deploy.vllm",
    "evaluate": "undial_peft.evals.report",
    "run_attacks": "undial_peft.evals.attacks",
    **{name: "undial_peft.errors" for name in (
        "UndialError", "UndialConfigError", "UndialDataError", "UndialModelError", "UndialStackError",
        "UndialExportError", "UndialTrainingError", "OutputExistsError")},
}

__all__ = [
    "__version__",
    "OutputExistsError",
    "UndialConfig",
    "UndialConfigError",
    "UndialDataError",
    "UndialError",
    "UndialExportError",
    "UndialModelError",
    "UndialStackError",
    "UndialTrainer",
    "UndialTrainingError",
    "attach",
    "check_vllm",
    "evaluate",
    "export_gguf",
    "export_stack",
    "forget",
    "load_model",
    "merge_stack",
    "preview_keys",
    "run_attacks",
    "undial_loss",
    "undial_loss_from_hidden",
]

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time each name loads on first use
    from undial_peft.deploy.gguf_export import export_gguf
    from undial_peft.deploy.stack import attach, export_stack, merge_stack
    from undial_peft.deploy.vllm import check_vllm
    from undial_peft.errors import (
        OutputExistsError,
        UndialConfigError,
        UndialDataError,
        UndialError,
        UndialExportError,
        UndialModelError,
        UndialStackError,
        UndialTrainingError,
    )
    from undial_peft.evals.attacks import run_attacks
    from undial_peft.evals.report import evaluate
    from undial_peft.models import load_model
    from undial_peft.training.config import UndialConfig
    from undial_peft.training.forget import forget, preview_keys
    from undial_peft.training.loss import undial_loss, undial_loss_from_hidden
    from undial_peft.training.trainer import UndialTrainer

# bitsandbytes logs this at import on CPUs with AVX512-BF16 when the optional 'kernels' package
# cannot fetch its fused CPU kernel; it then falls back to its own kernel. peft imports
# bitsandbytes whenever it is installed, so without this every forget, eval or --4bit run would
# print it though there is nothing to act on. Only that message on that logger is dropped; the
# filter sits on the logger (not a handler) so it holds whatever handlers an application adds,
# and it is installed here, before any of our modules imports peft.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropBitsandbytesKernelsNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_KERNELS_NOTICE)


logging.getLogger(_BNB_CPU_LOGGER).addFilter(_DropBitsandbytesKernelsNotice())


def __getattr__(name: str):
    # Loading on first use keeps `import undial_peft` free of torch/transformers/peft.
    if name not in _API:
        raise AttributeError(f"module 'undial_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
