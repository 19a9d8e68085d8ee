"""undial_peft: make a deployed LLM forget data by attaching small LoRA adapters (UNDIAL).

>>> from undial_peft import forget, attach, UndialConfig  # doctest: +SKIP
>>> adapter = forget("default", "forget.jsonl", "adapters/req-001", config=UndialConfig(beta=10))  # doctest: +SKIP
>>> model = attach("default", [adapter])  # doctest: +SKIP
"""

__version__ = "0.1.0"

__all__ = ["UndialConfig", "__version__", "attach", "evaluate", "forget", "undial_loss", "undial_loss_from_hidden"]


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
