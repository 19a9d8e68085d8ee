"""The benchmark's target and reference models: fine-tune until memorised, measure memorisation.

>>> # stats = memorise(model, tokenizer, rows, QUICK, seed=0); stats["final_loss"]
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from undial_peft.bench.settings import BenchSize, RealSize
from undial_peft.data.digests import data_digest
from undial_peft.data.encoding import Collator, encode
from undial_peft.data.readers import Example
from undial_peft.evals import scoring
from undial_peft.utils.storage import atomic_directory


def rows_digest(rows: Sequence[dict[str, Any]]) -> str:
    """The keyed digest (`data.data_digest`) of question/answer rows: names them in a recipe without their text."""
    return data_digest([Example(r["question"], r["answer"]) for r in rows])


def recipe_key(recipe: dict[str, Any]) -> str:
    """A short hash of a JSON-ready recipe (paths as strings): the cache name of what it produces.

    >>> recipe_key({"lr": 3e-4}) == recipe_key({"lr": 3e-4}) != recipe_key({"lr": 1e-3})
    True
    """
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def full_fine_tune(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, str]], *, steps: int, batch_size: int, lr: float,
    seed: int, check: Callable[[int], bool] | None = None, check_every: int = 0,
) -> dict[str, Any]:
    """Fine-tune every parameter that requires grad on ``rows`` (answer tokens only, chat template as
    evaluation uses it): AdamW, one-cycle schedule (10% warm-up), shuffled batches, up to ``steps``
    steps; every ``check_every`` steps ``check(step)`` may end training early (it returns True).

    >>> # full_fine_tune(model, tokenizer, [{"question": "Q?", "answer": "A."}], steps=10, batch_size=8, lr=1e-4, seed=0)
    """
    features = [encode(tokenizer, Example(r["question"], r["answer"]), 128) for r in rows]
    collate = Collator(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    order: list[int] = []
    losses = []
    started = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(len(features), generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        batch = collate([features[i] for i in picked])
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
        if check is not None and check_every and step % check_every == 0:
            model.eval()
            done = check(step)
            model.train()
            if done:
                break
    model.eval()
    return {"final_loss": float(sum(losses[-10:]) / len(losses[-10:])), "seconds": time.perf_counter() - started,
            "steps": len(losses)}


def memorise(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, str]], size: BenchSize, seed: int
) -> dict[str, float]:
    """The tiny target's fine-tune: `full_fine_tune` with the size's steps, batch and learning rate."""
    return full_fine_tune(model, tokenizer, rows, steps=size.pretrain_steps, batch_size=size.pretrain_batch_size,
                          lr=size.pretrain_lr, seed=seed)


def mean_answer_probability(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, str]]) -> float:
    """`scoring.mean_answer_probability` over question/answer dict rows."""
    return scoring.mean_answer_probability(model, tokenizer, [Example(r["question"], r["answer"]) for r in rows],
                                           batch_size=32)


def load_target(directory: Path) -> tuple[Any, Any]:
    """A saved target or reference model and its tokenizer, in eval mode."""
    from undial_peft.models import load_model

    model, tokenizer = load_model(directory)
    return model.eval(), tokenizer


# SmolLM2's template adds a default system line when a conversation has none: ~20 of the ~60 tokens
# of a benchmark row. The targets are saved with a template without it, which makes every forward of
# the fine-tune, the unlearning runs and the evaluations a third cheaper; questions still go through
# the chat format the model was instruction-tuned on.
_DEFAULT_SYSTEM = re.compile(r"\{%-? if loop\.first and messages\[0\]\['role'\] != 'system' -?%\}.*?\{%-? endif -?%\}", re.S)


def drop_default_system_prompt(tokenizer: Any) -> bool:
    """Remove the default system line from the tokenizer's chat template; True if there was one.

    >>> from types import SimpleNamespace
    >>> t = SimpleNamespace(chat_template="{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    ...                     "{{ 'SYS' }}{% endif %}{{ m['content'] }}{% endfor %}")
    >>> drop_default_system_prompt(t), t.chat_template
    (True, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not _DEFAULT_SYSTEM.search(template):
        return False
    tokenizer.chat_template = _DEFAULT_SYSTEM.sub("", template, count=1)
    return True


def freeze_for_fine_tune(model: torch.nn.Module, trained_layers: int | None) -> int:
    """Leave only the top ``trained_layers`` decoder layers and the final norm trainable (None: every
    parameter but the embeddings). Returns the number of trainable parameters.

    Frozen lower layers need no backward pass: with 10 of SmolLM2's 30 layers trained, a step costs
    about half of a full fine-tune's, and the facts are still memorised (answer probability >= 0.9).
    """
    model.requires_grad_(trained_layers is None)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied to the head in SmolLM2
    if trained_layers is not None:
        decoder = model.get_decoder()
        for layer in decoder.layers[len(decoder.layers) - trained_layers :]:
            layer.requires_grad_(True)
        decoder.norm.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def file_identity(model: str | Path) -> dict[str, Any]:
    """A cheap identity of a base model for cache keys: its file (or directory) name and size in bytes."""
    from undial_peft.models import local_path

    path = local_path(model)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"name": path.name, "bytes": sum(p.stat().st_size for p in files)}


def cached_fine_tune(
    model: str | Path, name: str, rows: Sequence[dict[str, Any]], size: RealSize, cache: Path, seed: int, *,
    probe: Sequence[dict[str, Any]] = (), log: Callable[[str], Any] = print,
) -> tuple[Path, dict[str, Any]]:
    """Fine-tune ``model`` on ``rows`` into ``cache/<name>-<recipe hash>``, or reuse that directory.

    The recipe (base identity, data hash, training settings) names the directory, so a changed
    recipe trains anew and an unchanged one is never trained twice. Written atomically: a directory
    with a ``recipe.json`` is complete. Returns the path and the fine-tune's statistics (seconds,
    final loss, answer probability on ``rows`` and on ``probe``).
    """
    from undial_peft.models import load_model

    recipe = {"format": 1, "base": file_identity(model), "rows": len(rows), "rows_digest": rows_digest(rows),
              "max_epochs": size.finetune_epochs, "memorised_at": size.memorised_at, "lr": size.finetune_lr, "batch_size": size.finetune_batch_size,
              "trained_layers": size.trained_layers, "seed": seed, "default_system_prompt": False}
    path = cache / f"{name}-{recipe_key(recipe)}"
    if (path / "recipe.json").is_file():
        stats = json.loads((path / "recipe.json").read_text(encoding="utf-8"))["stats"]
        log(f"[bench] {name}: cached in {path} (fine-tuned in {stats['seconds']:.0f}s; rerun skipped)")
        return path, {**stats, "cached": True}
    torch.manual_seed(seed)
    base, tokenizer = load_model(model)
    drop_default_system_prompt(tokenizer)
    trainable = freeze_for_fine_tune(base, size.trained_layers)
    per_epoch = -(-len(rows) // size.finetune_batch_size)
    epochs: list[dict[str, float]] = []
    tick = [time.perf_counter(), time.process_time()]

    def memorised(step: int) -> bool:
        """After each epoch: stop once the mean answer probability on the rows reaches the target."""
        probability = mean_answer_probability(base, tokenizer, rows)
        epochs.append({"epoch": step // per_epoch, "probability": probability, "seconds": time.perf_counter() - tick[0],
                       "cpu_seconds": time.process_time() - tick[1]})
        log(f"[bench] {name}: epoch {step // per_epoch}, answer probability {probability:.3f}"
            f" ({epochs[-1]['seconds']:.0f}s, {epochs[-1]['cpu_seconds']:.0f} CPU s)")
        return probability >= size.memorised_at

    stats: dict[str, Any] = full_fine_tune(base, tokenizer, rows, steps=size.finetune_epochs * per_epoch,
                                           batch_size=size.finetune_batch_size, lr=size.finetune_lr, seed=seed,
                                           check=memorised, check_every=per_epoch)
    stats.update(epochs=epochs, trainable_parameters=trainable, train_rows=len(rows),
                 train_probability=epochs[-1]["probability"] if epochs else mean_answer_probability(base, tokenizer, rows),
                 probe_probability=mean_answer_probability(base, tokenizer, probe) if probe else None)
    try:
        with atomic_directory(path) as staging:
            base.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
            (staging / "recipe.json").write_text(json.dumps({"recipe": recipe, "stats": stats}, indent=1),
                                                 encoding="utf-8")
    except FileExistsError:  # another run finished the same recipe first: same recipe, same model
        log(f"[bench] {name}: {path} was written by another run meanwhile; using it")
    probed = f", on the single request {stats['probe_probability']:.3f}" if probe else ""
    log(f"[bench] {name}: {len(rows)} rows, {stats['steps']} steps in {stats['seconds']:.0f}s; answer probability on its rows"
        f" {stats['train_probability']:.3f}{probed}")
    if stats["train_probability"] < 0.9:
        log(f"[bench] WARNING: {name} memorised only {stats['train_probability']:.3f} (< 0.9); raise finetune_epochs.")
    return path, {**stats, "cached": False}
