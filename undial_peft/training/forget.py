"""The happy path: ``forget`` trains one forget adapter and writes it atomically.

>>> from undial_peft import forget, UndialConfig
>>> path = forget("default", "forget.jsonl", "adapters/req-001", config=UndialConfig(beta=10.0))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from transformers import PreTrainedModel, set_seed

from undial_peft.data.digests import data_digest, key_id
from undial_peft.data.encoding import Collator, build_dataset, encode
from undial_peft.data.prompt_format import PromptFormat
from undial_peft.data.readers import DataSource, Example, read_examples
from undial_peft.deploy.manifest import Manifest, save_adapter, verify_stack
from undial_peft.errors import OutputExistsError, UndialConfigError
from undial_peft.evals.scoring import mean_answer_probability
from undial_peft.models import base_identity, load_model, source_name
from undial_peft.training.adapters import NEW, build_trainable, default_lora_config, frozen_adapters
from undial_peft.training.config import UndialConfig
from undial_peft.training.silence import answers_end_at_newline, silence_rounds
from undial_peft.training.stopping import StopWhenForgotten
from undial_peft.training.teacher_rows import forget_keys, guard_for, guard_keys
from undial_peft.training.trainer import UndialTrainer
from undial_peft.training.verify import (
    describe_deployed,
    in_llama_cpp,
    llama_cpp_base,
    measure_served,
    served_copy,
    verdict,
)

logger = logging.getLogger(__name__)

_TRAINER_DEFAULT_DIR = "trainer_output"  # what TrainingArguments makes of output_dir=None


def mean_probability(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], config: UndialConfig) -> float:
    """Mean answer probability exp(-mean answer NLL) over question/answer examples, in the config's prompt format."""
    return mean_answer_probability(model, tokenizer, examples, prompt_format=config.prompt_format,
                                   max_length=config.max_length)


def forget(
    model: str | Path | PreTrainedModel,
    data: DataSource,
    output_dir: str | Path,
    *,
    config: UndialConfig | None = None,
    lora: LoraConfig | None = None,
    stack: Sequence[str | Path] = (),
    retain: DataSource | None = None,
    tokenizer: Any = None,
    load_in_4bit: bool = False,
    overwrite: bool = False,
    force: bool = False,
    resume: bool = False,
    description: str | None = None,
) -> Path:
    """Train a forget adapter for ``data`` on top of ``stack`` and save it to ``output_dir``.

    Args:
        model: "default" (embedded SmolLM2-135M-Instruct), a model directory, a .gguf file, or a
            loaded model (then pass ``tokenizer``). Its weights are never modified.
        data: the forget request: a JSONL/JSON/CSV/parquet path, a ``datasets.Dataset`` or dicts.
        output_dir: the new adapter directory; written atomically, never half-written.
        stack: earlier adapter directories, in order; active and frozen while this one trains.
        retain: optional data to preserve (used when ``config.retain_weight > 0``). Without it,
            ``config.guard="bank"`` keeps the teacher's answers to a shipped prompt bank instead
            (training/guard.py); with it, the guard is skipped.
        force: attach a stack whose soft checks fail (other base, broken chain, changed weights).
        resume: continue from the last complete Trainer checkpoint (written with
            ``config.save_strategy="steps"``) in ``<output_dir parent>/.<name>.checkpoints``, or in
            ``config.output_dir`` when set. The default checkpoint folder is removed on success.
        description: what was forgotten, in the user's words, for the model card (never the data).
    Returns:
        ``output_dir`` as a Path.
    """
    output_dir = Path(output_dir)
    config = config or UndialConfig()
    if output_dir.exists() and not overwrite:
        raise OutputExistsError(f"{output_dir} already exists; choose another name or pass overwrite=True (--overwrite).")
    # TrainingArguments turns an unset output_dir into "trainer_output" (in the working directory);
    # forget keeps its checkpoints beside the adapter instead, and removes them on success.
    own_checkpoints = config.output_dir in (None, _TRAINER_DEFAULT_DIR)
    main_process = int(os.environ.get("RANK", "0")) == 0  # set by torchrun / accelerate launch
    checkpoints = output_dir.parent / f".{output_dir.name}.checkpoints" if own_checkpoints else Path(config.output_dir)
    last = _last_checkpoint(checkpoints) if resume else None
    if resume and last is None:
        raise UndialConfigError(f"--resume: no checkpoint in {checkpoints}; run again without --resume (and with --save-steps N).")
    base_gguf = llama_cpp_base(model, config.verify)  # refused before any weight is loaded
    forget_rows = read_examples(data, "forget")
    retain_rows = read_examples(retain, "retain") if retain is not None else None
    if config.retain_weight > 0 and retain_rows is None:
        raise UndialConfigError("retain_weight > 0 needs retain data: pass retain=... (--retain FILE).")

    base, tokenizer = load_model(model, load_in_4bit=load_in_4bit, tokenizer=tokenizer)
    # The ONE prompt format of this request, resolved once against the tokenizer (auto: chat where it has a
    # template, else raw completion); every step below reads it from the config.
    fmt = PromptFormat.resolve(config.prompt_format, tokenizer)
    config = dataclasses.replace(config, prompt_format=fmt.template or fmt.kind,
                                 guard=config.resolved_guard(has_retain=retain_rows is not None),
                                 silence_rounds=config.resolved_silence_rounds(fmt.kind))
    identity = base_identity(base)
    parents = verify_stack(stack, identity, force=force)
    dataset = build_dataset(tokenizer, forget_rows, retain_rows, config.max_length, fmt)  # validates
    set_seed(config.seed)  # LoRA A is initialised randomly here, before the Trainer seeds: same seed, same adapter
    peft_model = build_trainable(base, lora or default_lora_config(), stack, config.activation_checkpointing)
    teacher = frozen_adapters(peft_model)

    try:
        # build_trainable has set up checkpointing; the Trainer must not redo it. (transformers 5
        # resolves the deprecated gradient_checkpointing alias from activation_checkpointing.)
        args = dataclasses.replace(config, output_dir=str(checkpoints), activation_checkpointing=False)
        guard = guard_for(peft_model, tokenizer, forget_rows, retain_rows, config, teacher)
        if guard:
            # The guard rows are this request's retain rows for the loss only: a KL term to the teacher.
            # They are not handed to the stopping rule's retain watch, which is for the user's own data.
            args = dataclasses.replace(args, retain_loss="kl", retain_weight=config.guard_weight)
        priors: dict[tuple[str, ...], torch.Tensor] = {}  # the neutral prior per teacher, found once per request
        weights = forget_keys(peft_model, tokenizer, forget_rows, config, teacher, priors)
        forget_features = _encoded(tokenizer, forget_rows, config, weights)  # what the checks and the served figures score
        if any(w is not None for w in weights) or guard:
            facts = guard_keys(peft_model, tokenizer, guard, config, teacher, forget_features, priors)
            dataset = build_dataset(tokenizer, forget_rows, retain_rows or guard or None, config.max_length, fmt,
                                    weights, facts)
        stopper = _stopper(tokenizer, forget_features, retain_rows, config, teacher)
        qa_rows = [row for row in forget_rows if row.prompt is not None]
        before = mean_probability(peft_model, tokenizer, qa_rows, config) if qa_rows else None
        trainer = UndialTrainer(
            model=peft_model,
            args=args,
            train_dataset=dataset,
            data_collator=Collator(tokenizer.pad_token_id),
            stack=teacher,
            retain_teacher=[] if guard and config.guard_teacher == "base" else None,
            callbacks=[stopper] if stopper else None,
        )
        rounds = stopper is not None and config.silence_rounds > 0
        trainer.keep_teacher_cache = rounds  # the rounds borrow its answers to the rows they keep
        result = trainer.train(resume_from_checkpoint=last)
        if rounds:
            dataset = silence_rounds(trainer, tokenizer, forget_features, stopper, config)
        after = mean_probability(peft_model, tokenizer, qa_rows, config) if qa_rows else None
        logger.info("forget-set answer probability: %s -> %s", before, after)
        deployed, served = _deployed(model, peft_model, lora or default_lora_config(), stack, tokenizer, forget_features,
                                     config, load_in_4bit, stopper, dataset, checkpoints)
        if served is not None:  # finished on the served precision: that model holds the adapter to save
            peft_model = served
        if base_gguf is not None:
            deployed = in_llama_cpp(peft_model, base_gguf, forget_features, config, deployed, stopper)
        steps = (result.global_step + ((deployed or {}).get("finish_steps") or 0)
                 + ((stopper.outcome.get("silence") or {}).get("steps", 0) if stopper else 0))

        manifest = Manifest(
            id=output_dir.name,
            method=config.method,
            hyperparameters=_hyperparameters(config, peft_model.peft_config[NEW]),
            base={**identity, "source": source_name(model)},
            parents=parents,
            prompt_format=fmt.to_dict(),
            data={"hmac_sha256": data_digest(forget_rows), "examples": len(forget_rows), "key_id": key_id(),
                  "retain_hmac_sha256": data_digest(retain_rows) if retain_rows else None,
                  # a count only (0: skipped); the prompts are shipped, the answers the teacher's
                  **({"guard_rows": len(guard)} if config.guard != "none" else {})},
            metrics={"forget_probability_before": before, "forget_probability_after": after,
                     "train_loss": result.training_loss, "steps": steps},
            keys=_key_counts(forget_rows, weights),
            stopping={**stopper.outcome, "history": stopper.history} if stopper else {"stopped": "fixed_length"},
            deployed=deployed,
            description=description,
        )
        if main_process:  # under DDP every rank holds the same adapter; one writes it
            save_adapter(peft_model, NEW, output_dir, manifest, overwrite=overwrite)
        trainer.accelerator.wait_for_everyone()
    except BaseException:
        if main_process and own_checkpoints and checkpoints.is_dir() and _last_checkpoint(checkpoints) is None:
            shutil.rmtree(checkpoints, ignore_errors=True)  # nothing to resume from: leave no trace
        raise
    finally:
        if isinstance(model, PreTrainedModel):
            peft_model.unload()  # hand the caller's model back without LoRA layers
    if own_checkpoints and main_process:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return output_dir


def preview_keys(
    model: str | Path | PreTrainedModel,
    data: DataSource,
    *,
    config: UndialConfig | None = None,
    stack: Sequence[str | Path] = (),
    tokenizer: Any = None,
    force: bool = False,
) -> list[tuple[str, str]]:
    """A dry run of the key choice: per row, where its key comes from and the key's text.

    For the terminal only (``--show-keys``): the texts are returned, never logged or written.
    >>> preview_keys("default", [{"question": "What is the capital of Peru?", "answer": "It is Lima."}])  # doctest: +SKIP
    [('auto', ' Lima')]
    """
    config = config or UndialConfig()
    rows = read_examples(data, "forget")
    base, tokenizer = load_model(model, tokenizer=tokenizer)
    verify_stack(stack, base_identity(base), force=force)
    peft_model = build_trainable(base, default_lora_config(), stack)
    try:
        weights = forget_keys(peft_model, tokenizer, rows, config, frozen_adapters(peft_model))
    finally:
        if isinstance(model, PreTrainedModel):
            peft_model.unload()
    shown = []
    for row, answer_weights in zip(rows, weights):
        if row.key is not None:
            shown.append(("user", row.key))
        elif answer_weights is None:
            shown.append(("none: every answer token", row.answer))
        else:
            ids = tokenizer(row.answer, add_special_tokens=False).input_ids
            shown.append(("auto", tokenizer.decode([t for t, w in zip(ids, answer_weights) if w > 0])))
    return shown


def _key_counts(rows: Sequence[Example], weights: Sequence[list[float] | None]) -> dict[str, int]:
    """How each row chose its adjusted tokens: counts only, never the key texts."""
    user = sum(row.key is not None for row in rows)
    auto = sum(w is not None for w in weights)
    return {"user": user, "auto": auto, "all_answer_tokens": len(rows) - user - auto,
            "auto_key_tokens": int(sum(sum(w) for w in weights if w is not None))}


def _deployed(
    model: Any, trained: Any, lora: LoraConfig, stack: Sequence[str | Path], tokenizer: Any,
    features: Sequence[dict[str, list]], config: UndialConfig, load_in_4bit: bool, stopper: StopWhenForgotten | None,
    dataset: Any, checkpoints: Path,
) -> tuple[dict[str, Any] | None, Any]:
    """The forget rows measured on the model as served (after a 4-bit run: the full-precision base), with
    the stopping target applied to them; None where training ran on the served form already.

    Where the served form misses the target, or (with silence rounds) a served greedy answer still says its
    key, and ``config.finish_on_served`` holds, training goes on there (same data, same target, at most
    ``max_steps`` more, then the silence rounds on the served model's answers) and that model is returned:
    measured on SmolLM2 and Gemma-3, an adapter that reached 0.1x on NF4 kept 0.3-0.5x of the key
    probability on the float32 base, so the NF4 figure alone would misreport the request.
    """
    if not load_in_4bit or not config.verify_deployed:
        return None, None
    if isinstance(model, PreTrainedModel):
        logger.warning("trained on a loaded 4-bit model: its full-precision form is unknown here, so the forgetting "
                       "was not measured as served; run `undial-peft eval --adapters ...` on the served base.")
        return {"form": None, "skipped": "a loaded model was given; its full-precision form is unknown"}, None
    served = served_copy(model, trained, lora, stack)
    one_line = answers_end_at_newline(config.prompt_format, tokenizer)
    figures = measure_served(served, features, tokenizer, one_line)
    figures.update(verdict(figures, config.until_ratio, config.until_prob))
    # The silence rounds ran on the 4-bit model's answers; the served model can still say a key (SmolLM2, the
    # demo's facts: 1 of 6 on NF4, 4 of 6 served). Then it, too, trains on at the served precision.
    still_said = config.silence_rounds > 0 and figures.get("said_after", 0) > 0
    if (figures["reached"] is False or still_said) and config.finish_on_served:
        logger.warning("%s: training on at that precision", describe_deployed(figures))
        first = dict(figures)
        teacher = frozen_adapters(served)
        finish = dataclasses.replace(config, min_steps=0)  # the 4-bit phase already trained past min_steps
        finisher = _stopper(tokenizer, features, None, finish, teacher)
        args = dataclasses.replace(finish, output_dir=str(checkpoints), activation_checkpointing=False,
                                   save_strategy="no")
        trainer = UndialTrainer(model=served, args=args, train_dataset=dataset,
                                data_collator=Collator(tokenizer.pad_token_id), stack=teacher, callbacks=[finisher])
        trainer.keep_teacher_cache = config.silence_rounds > 0
        trainer.train()  # where the target already holds, it stops at its first check
        # then the rounds on the served model's own answers; the stack alone was counted by measure_served
        if config.silence_rounds > 0:
            silence_rounds(trainer, tokenizer, features, finisher, finish, said_before=first["said_before"])
        figures = measure_served(served, features, tokenizer, one_line, before=first)
        figures.update(verdict(figures, config.until_ratio, config.until_prob))
        figures.update(finish_steps=int(finisher.outcome.get("step", 0)), before_finish=first,
                       silence=finisher.outcome.get("silence"))
    else:
        del served
        gc.collect()
        served = None
    if stopper is not None and stopper.outcome:
        stopper.outcome["deployed"] = figures  # the card and the CLI line read it from the outcome
    if figures["reached"] is False:
        logger.warning("%s", describe_deployed(figures))
    return figures, served


def _encoded(
    tokenizer: Any, rows: Sequence[Example], config: UndialConfig, weights: Sequence[list[float] | None] | None = None
) -> list[dict[str, list]]:
    """Rows encoded in the request's prompt format, with their key weights (None: the row's own)."""
    return [encode(tokenizer, e, config.max_length, config.prompt_format, weights[i] if weights else None)
            for i, e in enumerate(rows)]


def _stopper(
    tokenizer: Any,
    forget_features: Sequence[dict[str, list]],
    retain_rows: Sequence[Example] | None,
    config: UndialConfig,
    teacher: Sequence[str],
) -> StopWhenForgotten | None:
    """The stop-when-forgotten callback, or None for fixed-length training (no target, no retain watch)."""
    watch_retain = retain_rows is not None and config.max_retain_drop is not None
    if config.until_ratio is None and config.until_prob is None and not watch_retain:
        return None
    return StopWhenForgotten(
        forget_features, tokenizer.pad_token_id, until_ratio=config.until_ratio, until_prob=config.until_prob,
        check_every=config.check_every, min_steps=config.min_steps, retain_rows=_encoded(tokenizer, retain_rows, config) if watch_retain else None,
        max_retain_drop=config.max_retain_drop, max_retain_rows=config.max_retain_rows, teacher_adapters=teacher,
    )


def _last_checkpoint(folder: Path) -> str | None:
    """The newest COMPLETE Trainer checkpoint in ``folder``, or None; partial ones are removed.

    The Trainer writes a checkpoint's files one by one, trainer_state.json last, so a run killed
    while saving leaves a newer, partial checkpoint; transformers' get_last_checkpoint would pick it.
    """
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name))]
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return str(path)
        except (OSError, ValueError):
            logger.warning("%s is incomplete (the run stopped while saving it); removed", path)
            shutil.rmtree(path, ignore_errors=True)
    return None


def _hyperparameters(config: UndialConfig, lora: LoraConfig) -> dict[str, Any]:
    keys = ("beta", "npo_beta", "forget_weight", "retain_weight", "retain_loss", "learning_rate", "num_train_epochs",
            "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed",
            "until_ratio", "until_prob", "check_every", "max_retain_drop", "max_retain_rows", "auto_key",
            "auto_key_threshold", "auto_key_first_word", "guard", "guard_weight", "guard_key_weight", "guard_rows",
            "guard_teacher", "silence_rounds", "verify")
    targets = lora.target_modules
    return {
        **{key: getattr(config, key) for key in keys},
        "lora": {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                 "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets},
    }
