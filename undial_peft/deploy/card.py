"""Model cards (README.md) for adapter directories, written from the manifest alone.

>>> print(model_card({"id": "req-001", "method": "undial", "hyperparameters": {"beta": 10.0},
...                   "base": {"fingerprint": "ab" * 32}, "parents": [], "metrics": {}}).splitlines()[0])
---
"""

from __future__ import annotations

from typing import Any

from undial_peft.training.stopping import describe_outcome


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _stopping(outcome: dict[str, Any] | None) -> list[str]:
    if not outcome or outcome.get("stopped") == "fixed_length" or "forget_after" not in outcome:
        return [f"- Training: {'fixed length' if outcome else 'not recorded'}"]
    return [f"- Training {describe_outcome(outcome)}"]


def model_card(manifest: dict[str, Any]) -> str:
    """A peft-style card: what the adapter is, how it was trained, what it measured; never the data."""
    params = manifest.get("hyperparameters", {})
    parents = [p["id"] for p in manifest.get("parents", [])]
    lines = [
        "---",
        "library_name: peft",
        "tags: [undial, unlearning, lora]",
        "---",
        f"# Forget adapter `{manifest['id']}`",
        "",
        manifest.get("description") or "A forget request (no description given).",
        "",
        f"- Method: {manifest['method']} (UNDIAL: self-distillation with adjusted logits, arXiv 2402.10052)",
        f"- Base model fingerprint: `{manifest['base']['fingerprint'][:16]}`",
        f"- Stacked on: {', '.join(parents) if parents else 'the bare base model'}",
        f"- Examples: {manifest.get('data', {}).get('examples', '?')} (only a keyed hash of them is stored)",
        *_stopping(manifest.get("stopping")),
        "",
        "| hyperparameter | value |",
        "| --- | --- |",
        *(f"| {key} | {_value(value)} |" for key, value in sorted(params.items()) if key != "lora"),
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {key} | {_value(value)} |" for key, value in sorted(manifest.get("metrics", {}).items())),
        "",
        "Attach with `undial_peft.attach(base, [...stack, this_dir])`. The base weights still hold what",
        "this adapter suppresses: the forgetting holds only while the adapter is attached.",
        "",
    ]
    return "\n".join(lines)
