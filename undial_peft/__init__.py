"""undial_peft: make a deployed LLM forget data by attaching small LoRA adapters (UNDIAL).

>>> from undial_peft import forget, attach, UndialConfig  # doctest: +SKIP
>>> adapter = forget("default", "forget.jsonl", "adapters/req-001", config=UndialConfig(beta=10))  # doctest: +SKIP
>>> model = attach("default", [adapter])  # doctest: +SKIP
"""

import logging

__version__ = "0.1.0"

__all__ = ["UndialConfig", "__version__", "attach", "evaluate", "forget", "undial_loss", "undial_loss_from_hidden"]

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
    # Everything imports torch/transformers/peft; load on first use, so that `undial-peft --help`
    # and the CLI can decide what gets imported (see cli.main).
    if name == "UndialConfig":
        from .config import UndialConfig

        return UndialConfig
    if name in ("undial_loss", "undial_loss_from_hidden"):
        from . import loss

        return getattr(loss, name)
    if name == "forget":
        from .api import forget

        return forget
    if name == "attach":
        from .stack import attach

        return attach
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    raise AttributeError(name)
