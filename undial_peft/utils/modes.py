"""Run a model in eval (or train) mode for a while and hand it back in the mode it was in.

>>> import torch
>>> layer = torch.nn.Dropout().train()
>>> with model_mode(layer):
...     layer.training
False
>>> layer.training
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def model_mode(model: torch.nn.Module, training: bool = False) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (train mode with ``training=True``) inside the block, restored after, even on errors."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)
