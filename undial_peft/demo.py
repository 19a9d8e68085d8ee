"""The offline demo: SmolLM2-135M-Instruct forgets a few real facts and keeps the others.

Facts come from ``undial_peft/data/demo_facts.jsonl``, chosen by measuring what the model knows
(each answer is the model's own greedy sentence, probability >= 0.5). The demo prints each
fact's answer probability and greedy answer before and after one forget adapter is trained.

>>> run_demo(epochs=1)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import numpy as np

from undial_peft.data.encoding import encode
from undial_peft.data.packaged import demo_facts
from undial_peft.data.readers import Example
from undial_peft.deploy.manifest import read_manifest
from undial_peft.evals.metrics import answer_probability
from undial_peft.evals.report import greedy_answers, score
from undial_peft.training.config import UndialConfig
from undial_peft.training.silence import says, spoken_key
from undial_peft.training.stopping import describe_outcome
from undial_peft.utils.tables import dict_rows


def measure_facts(model: Any, tokenizer: Any, facts: list[dict[str, str]], config: UndialConfig) -> list[dict[str, Any]]:
    """Per fact: answer probability, probability of saying the key (given the answer so far), greedy answer."""
    rows = [Example(f["question"], f["answer"], f["key"]) for f in facts]
    scores = score(model, tokenizer, rows, prompt_format=config.prompt_format, max_length=config.max_length)
    answers = greedy_answers(model, tokenizer, [f["question"] for f in facts], max_new_tokens=24,
                             prompt_format=config.prompt_format)
    measured = []
    for row, s, answer in zip(rows, scores, answers):
        on_key = np.array(encode(tokenizer, row, config.max_length, config.prompt_format)["beta_weight"])[-len(s.logprobs):] > 0
        measured.append({"p": answer_probability(s.logprobs), "p_key": float(np.exp(s.logprobs[on_key].sum())),
                         "said": says(answer, spoken_key([row.key])), "answer": answer})
    return measured


def _clip(text: str, width: int = 44) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run_demo(
    model: str = "default",
    output_dir: str | Path | None = None,
    epochs: float | None = None,
    learning_rate: float | None = None,
    beta: float | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Forget the demo's "forget" facts; print and return the before/after table.

    The request is plain question/answer rows (keys found automatically) trained with `forget`'s
    defaults, stopping when forgotten; ``epochs`` switches to fixed-length training.
    """
    from undial_peft.deploy.stack import attach
    from undial_peft.models import load_model
    from undial_peft.training.forget import forget

    started = time.perf_counter()
    facts = demo_facts()
    forget_facts = [f for f in facts if f["split"] == "forget"]
    chosen = {"learning_rate": learning_rate, "beta": beta}
    fixed = {"num_train_epochs": epochs, "max_steps": -1, "until_ratio": None} if epochs is not None else {}
    config = UndialConfig(**{k: v for k, v in chosen.items() if v is not None}, **fixed,
                          per_device_train_batch_size=len(forget_facts), logging_steps=1, disable_tqdm=True)
    log(f"[demo] loading {model} ...")
    base, tokenizer = load_model(model)
    log(f"[demo] loaded in {time.perf_counter() - started:.0f}s; measuring {len(facts)} facts before unlearning ...")
    before = measure_facts(base, tokenizer, facts, config)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output_dir = Path(output_dir or f"adapters/demo-{stamp}")
    length = f"{epochs:g} epochs" if epochs is not None else f"until {config.until_ratio:g}x, at most {config.max_steps} steps"
    log(f"[demo] training a forget adapter on {len(forget_facts)} plain rows (beta={config.beta:g}, lr={config.learning_rate:g}, "
        f"{length}) ...")
    started_training = time.perf_counter()
    adapter = forget(base, [{"question": f["question"], "answer": f["answer"]} for f in forget_facts], output_dir,
                     config=config, tokenizer=tokenizer, description="Demo: six well-known facts (capitals and authors).")
    stopping = (read_manifest(adapter) or {}).get("stopping", {})
    log(f"[demo] trained in {time.perf_counter() - started_training:.0f}s; "
        + (describe_outcome(stopping) if "forget_after" in stopping else "fixed length"))
    log(f"[demo] saved {output_dir}; measuring again with the adapter attached ...")
    after = measure_facts(attach(base, [output_dir], tokenizer=tokenizer), tokenizer, facts, config)
    rows = [
        {"split": f["split"], "question": _clip(f["question"], 34), "p_before": b["p"], "p_after": a["p"],
         "key": f["key"], "p_key_before": b["p_key"], "p_key_after": a["p_key"], "said_after": a["said"],
         "answer_after": _clip(a["answer"])}
        for f, b, a in zip(facts, before, after)
    ]
    summary = {
        f"{split}_{metric}": float(np.mean([r[metric] for r in rows if r["split"] == split]))
        for split in ("forget", "keep")
        for metric in ("p_before", "p_after", "p_key_before", "p_key_after")
    }
    for split in ("forget", "keep"):
        summary[f"{split}_said_before"] = sum(b["said"] for f, b in zip(facts, before) if f["split"] == split)
        summary[f"{split}_said_after"] = sum(r["said_after"] for r in rows if r["split"] == split)
    log(dict_rows(rows))
    for split in ("forget", "keep"):
        log(f"[demo] {split:6s} mean answer probability {summary[f'{split}_p_before']:.3f} -> "
            f"{summary[f'{split}_p_after']:.3f}; key probability {summary[f'{split}_p_key_before']:.3f} -> "
            f"{summary[f'{split}_p_key_after']:.3f}; greedy answer names the key "
            f"{summary[f'{split}_said_before']} -> {summary[f'{split}_said_after']} times")
    log(f"[demo] done in {time.perf_counter() - started:.0f}s; adapter: {output_dir}")
    return {"rows": rows, "summary": summary, "adapter": str(output_dir)}
