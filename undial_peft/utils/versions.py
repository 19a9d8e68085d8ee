"""Versions of the packages a result depends on, recorded in manifests and reports.

>>> sorted(versions())
['peft', 'torch', 'transformers', 'undial_peft']
"""

from __future__ import annotations


def versions() -> dict[str, str]:
    """{package: version} for undial_peft, torch, transformers and peft."""
    import peft
    import torch
    import transformers

    from undial_peft import __version__

    return {"undial_peft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}
