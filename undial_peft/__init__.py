"""undial_peft: make a deployed LLM forget data by attaching small LoRA adapters (UNDIAL).

>>> from undial_peft import forget, attach, UndialConfig  # doctest: +SKIP
>>> adapter = forget("default", "forget.jsonl", "adapters/req-001", config=UndialConfig(beta=10))  # doctest: +SKIP
>>> model = attach("default", [adapter])  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .config import UndialConfig  # noqa: E402
from .loss import undial_loss, undial_loss_from_hidden  # noqa: E402

__all__ = ["UndialConfig", "__version__", "attach", "evaluate", "forget", "undial_loss", "undial_loss_from_hidden"]


def __getattr__(name: str):
    # The heavy entry points import transformers/peft; load them on first use.
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
