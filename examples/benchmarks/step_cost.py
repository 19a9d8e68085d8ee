"""What one UNDIAL training step costs, against plain LoRA SFT and the deep-copy reference design.

Every measurement runs in its own process (this script re-invoked with ``--child``), so a
variant's peak memory is its own. Four sections, each printed as one table:

step     one optimizer step on random token ids (batch 4; labels on the second half), per variant:
           lora_sft       plain LoRA SFT (r=8, all-linear): NLL from ``model(labels=...)``
           undial         `adapters.build_trainable` + `UndialTrainer.compute_loss` (fused head), live teacher
           undial_mmap    ``undial`` with glibc's mmap threshold pinned at 128 KiB (``cpu_mmap_threshold``):
                          the same step, freed buffers returned to the OS (less memory, more page faults)
           undial_mmap_huge  the same with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (2 MiB pages for
                          glibc's mmaps where THP is "madvise": fewer page faults)
           undial_trim    ``undial`` with ``malloc_trim(0)`` once per step, after the loss, before backward
           undial_cached  the same reading the cached teacher (`teacher_cache`): a step from the second
                          epoch on; ``cache_s`` is the one teacher pass that fills the cache, paid once
           undial_full    live teacher with ``loss_chunk_size=0``: full (B, T, V) fp32 logits
           undial_gc      UNDIAL with gradient checkpointing (activations recomputed in backward)
           undial_4bit    UNDIAL on an NF4 (bitsandbytes) base, as ``forget --4bit``; _4bit_gc: + checkpointing
           undial_stack9  request 10: the new adapter over nine frozen random adapters run separately;
                          _stack9_fused: the nine as ONE concatenated adapter (what `forget` does)
           reference      what public implementations do: deep-copied frozen teacher, FULL fine-tuning,
                          `undial_loss` on full logits
         Median step time after warm-up, and peak memory. CPU: ``rss`` is the process's peak RSS
         (VmHWM) from the first training step on; ``peak`` (the ratios use it) is that minus the RSS
         of the interpreter and libraries before any model existed, i.e. model + optimizer +
         activations, comparable to the CUDA number; ``maxrss`` is ``ru_maxrss`` of the whole
         child, model loading included. CUDA: ``peak`` is ``torch.cuda.max_memory_allocated``.
         Where the reference does not fit in memory, ``--reference-bytes-per-param`` (measured on a
         smaller shape) times the parameter count stands in for it, marked "estimated".
loss     `undial_loss_from_hidden` vs `undial_loss` on full logits, forward + backward from hidden
         states (B=4, H=576, V=49152: SmolLM2's head), at several T: peak memory above the inputs.
chat     one UNDIAL step as `forget` trains a chat request: the packaged demo facts in the model's chat
         template, 8 forget rows and 8 guard rows (KL, weight 2, cached teacher), with the template's
         shared opening run once (``once``, `training.shared_prefix`, the default) and with every row
         run whole (``whole``). Median step time and peak memory; the tiny model's template shares
         too few tokens to run once, so --quick shows both alike.
latency  forward latency (batch 1, seq 128) of the base, one adapter, a stack of 8 adapters attached
         as is, the 8 exported as ONE adapter (`stack.export_stack`), and the 8 merged into the base.
         The 8 adapters are trained with `forget` for one step each on the packaged demo facts.
switch   milliseconds per teacher switch (enter + leave `adapters.adapter_state`): peft's
         ``set_adapter`` walk (the previous code, kept as the fallback) vs the cached LoRA layers.

``--allocator tcmalloc|jemalloc`` runs every child under that allocator (``LD_PRELOAD``, as
``forget --allocator``); the default is the system's (glibc), as a library caller gets it.

``--shape 360m|1b|8b`` runs on a random-weight model with the shape of SmolLM2-360M,
Llama-3.2-1B or Llama-3.1-8B (built by `gpu_memory.save_random`); memory and time do not depend
on the values.

Targets (checked at the end): step time UNDIAL / LoRA-SFT <= 1.40 (live teacher) and <= 1.05
(cached); peak memory UNDIAL / LoRA-SFT <= 1.10; against the reference: UNDIAL <= 0.40, with
checkpointing <= 0.25, 4-bit <= 0.20, 4-bit + checkpointing <= 0.12; latency export / single
<= 1.10 and merged / base ~ 1.

Commands (from the repository root)::

    python examples/benchmarks/step_cost.py                      # full: SmolLM2-135M, T=128 and 512 (~20-30 min on 2 cores)
    python examples/benchmarks/step_cost.py --quick --threads 1  # smoke run: tiny random Llama (~2-3 min)
    python examples/benchmarks/step_cost.py --sections step --seqs 128
    python examples/benchmarks/step_cost.py --sections loss latency --json cost.json
    python examples/benchmarks/step_cost.py --model path/to/model_dir --threads 8
    python examples/benchmarks/step_cost.py --shape 360m --sections step --seqs 128 --warmup 1 --steps 2
    python examples/benchmarks/step_cost.py --shape 1b --sections step --seqs 128 --warmup 1 --steps 2 \
        --variants undial undial_gc undial_4bit undial_4bit_gc lora_sft --reference-bytes-per-param 22.9

Run it alone on the machine: other processes inflate the times (memory is not affected).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import torch
from harness import fmt, random_batch, spawn, sync
from steps import (
    BATCH,
    BETA,
    LR,
    STEP_VARIANTS,
    PeakMemory,
    Step,
    build_step,
    demo_rows,
    maxrss_mib,
    model_dir,
    proc_status_mib,
    settle,
)

from undial_peft.utils.cpu_memory import ALLOCATORS, RELAUNCHED, allocator_environment

HEAD_HIDDEN, HEAD_VOCAB = 576, 49152  # SmolLM2-135M's LM head


# --- one training step (child) ----------------------------------------------------------------


def _unpacked_numel(param: torch.Tensor) -> int:
    """Parameters a weight holds: a 4-bit (bitsandbytes) weight's numel counts its packed bytes, its quant state the shape."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def timed_steps(step: Step, batch: dict[str, torch.Tensor], count: int) -> tuple[list[float], list[float]]:
    """Run ``count`` training steps on ``batch``: each one's seconds (device synced) and loss."""
    times, losses = [], []
    for _ in range(count):
        sync()
        start = time.perf_counter()
        losses.append(step(batch))
        sync()
        times.append(time.perf_counter() - start)
    return times, losses


def child_step(spec: dict[str, Any]) -> dict[str, Any]:
    from undial_peft.models import load_model

    device = harness.device()
    four_bit = "4bit" in spec["variant"]
    model, _ = load_model(spec["model"], load_in_4bit=four_bit)
    if not four_bit:  # bitsandbytes places 4-bit weights itself
        model.to(device)
    with tempfile.TemporaryDirectory() as workdir:
        batch = random_batch(model.config.vocab_size, spec["batch"], spec["seq"], device)
        step = build_step(spec["variant"], model, workdir, batch, spec.get("cpu_mmap_threshold"))
        params = sum(p.numel() for p in step.trained.parameters() if p.requires_grad)
        settle()
        memory = PeakMemory(device)
        before = memory.current()
        memory.reset()
        times, losses = timed_steps(step, batch, spec["warmup"] + spec["steps"])
        peak = memory.peak()
    return {
        "step_s": statistics.median(times[spec["warmup"]:]),
        "times_s": times,
        "peak_mib": peak,
        "net_mib": peak - spec["runtime_mib"],
        "before_mib": before,
        "maxrss_mib": maxrss_mib(),
        "peak_reset": memory.reset_ok,
        "trainable": params,
        "params": sum(_unpacked_numel(p) for p in model.parameters()),
        "cache_s": step.cache_s,
        "loss": losses[0],
    }


# --- loss-only memory (child) -----------------------------------------------------------------


def child_loss(spec: dict[str, Any]) -> dict[str, Any]:
    from undial_peft.training import loss as L

    device = harness.device()
    batch, seq, hidden, vocab = spec["batch"], spec["seq"], spec["hidden"], spec["vocab"]
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device).requires_grad_(False)
    student = torch.randn(batch, seq, hidden, device=device, requires_grad=True)  # (B, T, H)
    teacher = torch.randn(batch, seq, hidden, device=device)  # (B, T, H)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[:, : seq // 2] = -100

    def run() -> None:
        if spec["variant"] == "fused":
            loss = L.undial_loss_from_hidden(student, teacher, head, labels, BETA, chunk_size=spec["chunk"])
        else:
            with torch.no_grad():
                teacher_logits = head(teacher)  # (B, T, V)
            loss = L.undial_loss(head(student), teacher_logits, labels, BETA)
        loss.backward()
        student.grad = None

    run()  # warm-up (allocator, kernels); its peak is not counted
    settle()
    memory = PeakMemory(device)
    before = memory.current()
    memory.reset()
    sync()
    start = time.perf_counter()
    run()
    sync()
    elapsed = time.perf_counter() - start
    return {"time_s": elapsed, "peak_above_mib": memory.peak() - before, "peak_reset": memory.reset_ok}


# --- a chat request's step, its shared opening run once or not (child) -------------------------


def child_chat(spec: dict[str, Any]) -> dict[str, Any]:
    from undial_peft.data.encoding import Collator, build_dataset
    from undial_peft.data.readers import Example
    from undial_peft.models import load_model
    from undial_peft.training import shared_prefix
    from undial_peft.training.adapters import build_trainable, default_lora_config
    from undial_peft.training.config import UndialConfig
    from undial_peft.training.trainer import UndialTrainer

    if spec["variant"] == "whole":
        shared_prefix.MIN_SHARED = 1 << 30  # no batch shares that much: every row runs whole
    device = harness.device()
    model, tokenizer = load_model(spec["model"])
    model.to(device)
    facts = [Example(r["question"], r["answer"], r.get("key")) for r in demo_rows()]
    dataset = build_dataset(tokenizer, facts[:8], [Example(f.prompt, f.answer) for f in facts[8:16]])
    with tempfile.TemporaryDirectory() as workdir:
        torch.manual_seed(0)
        peft_model = build_trainable(model, default_lora_config()).train()
        args = UndialConfig(output_dir=workdir, beta=BETA, learning_rate=LR, retain_weight=2.0, retain_loss="kl",
                            teacher_cache="memory")
        trainer = UndialTrainer(model=peft_model, args=args, train_dataset=dataset,
                                data_collator=Collator(tokenizer.pad_token_id))
        trainer.teacher_cache = trainer._build_teacher_cache()  # what train() does first
        trainer.current_gradient_accumulation_steps = 1  # set by train(); the retain term reads it
        batch = {k: v.to(device) for k, v in trainer.data_collator([trainer.train_dataset[i] for i in range(8)]).items()}
        step = Step(lambda b: trainer.compute_loss(peft_model, b), trainer.create_optimizer(), peft_model, trainer)
        settle()
        memory = PeakMemory(device)
        memory.reset()
        times, _ = timed_steps(step, batch, spec["warmup"] + spec["steps"])
        peak = memory.peak()
    tokens = int(batch["attention_mask"].sum() + batch["retain_attention_mask"].sum())
    shared = [shared_prefix.shared_length(batch[f"{p}input_ids"], batch[f"{p}attention_mask"]) for p in ("", "retain_")]
    return {"step_s": statistics.median(times[spec["warmup"]:]), "times_s": times, "net_mib": peak - spec["runtime_mib"],
            "tokens": tokens, "shared": shared,
            "shares": any(shared_prefix.worth_sharing(batch[f"{p}input_ids"], batch[f"{p}attention_mask"])
                          for p in ("", "retain_"))}


def report_chat(results: dict[str, dict[str, Any]], checks: list[tuple[str, float | None, float]]) -> str:
    rows = []
    for variant, r in results.items():
        if "error" in r:
            rows.append([variant, "error: " + r["error"][:90], "", "", "", ""])
            continue
        rows.append([variant, fmt(r["step_s"], ".3f"), fmt(r["net_mib"], ".0f"), str(r["tokens"]),
                     "/".join(map(str, r["shared"])), fmt(_ratio(r, results.get("whole"), "step_s"))])
    if results.get("once", {}).get("shares"):  # a template that shares too little (the tiny one) runs both alike
        checks.append(("chat step time  once / whole", _ratio(results["once"], results.get("whole"), "step_s"), 0.85))
    header = ["chat step (8 forget + 8 guard rows)", "step_s", "peak_MiB", "tokens", "shared (forget/guard)", "time/whole"]
    return table(header, rows) + "\n(shared: the opening every row of the batch has, run once in `once`.)"


# --- inference latency (child) ----------------------------------------------------------------


def make_adapters(model: Any, tokenizer: Any, workdir: Path, count: int) -> list[Path]:
    """``count`` chained forget adapters, one `forget` step each on two demo facts (values do not matter)."""
    from undial_peft.training.config import UndialConfig
    from undial_peft.training.forget import forget

    rows = demo_rows()
    config = UndialConfig(max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1000,
                          disable_tqdm=True)
    stack: list[Path] = []
    for index in range(count):
        data = [rows[(2 * index + j) % len(rows)] for j in range(2)]
        stack.append(forget(model, data, workdir / f"req-{index:03d}", config=config, stack=stack, tokenizer=tokenizer))
    return stack


def child_latency(spec: dict[str, Any]) -> dict[str, Any]:
    from undial_peft.deploy.stack import attach, export_stack
    from undial_peft.models import load_model

    device = harness.device()
    base, tokenizer = load_model(spec["model"])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        stack = make_adapters(base, tokenizer, workdir, spec["adapters"])
        exported = export_stack(base, stack, workdir / "exported", tokenizer=tokenizer)
        setup_s = time.perf_counter() - start

        def fresh() -> Any:
            return copy.deepcopy(base)

        models = {
            "base": base,
            "single": attach(fresh(), stack[:1], tokenizer=tokenizer),
            f"stack{len(stack)}": attach(fresh(), stack, tokenizer=tokenizer),
            "export": attach(fresh(), [exported], tokenizer=tokenizer),
            "merged": attach(fresh(), stack, tokenizer=tokenizer).merge_and_unload(),
        }
    for model in models.values():
        model.to(device).eval()
    ids = torch.randint(0, base.config.vocab_size, (1, spec["seq"]), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    with torch.no_grad():
        logits = {name: model(input_ids=ids).logits.float() for name, model in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        for round_ in range(spec["warmup"] + spec["reps"]):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # rotate: no order bias
                sync()
                start = time.perf_counter()
                models[name](input_ids=ids)
                sync()
                if round_ >= spec["warmup"]:
                    times[name].append(time.perf_counter() - start)
    stacked = logits[f"stack{len(stack)}"]
    return {
        "ms": {name: 1e3 * statistics.median(values) for name, values in times.items()},
        "max_diff_vs_stack": {name: float((logits[name] - stacked).abs().max()) for name in ("export", "merged")},
        "setup_s": setup_s,
    }


# --- adapter switching (child) ----------------------------------------------------------------


def child_switch(spec: dict[str, Any]) -> dict[str, Any]:
    """Milliseconds per teacher switch (enter + leave the teacher's adapter state), peft's walk vs cached."""
    from undial_peft.models import load_model
    from undial_peft.training.adapters import (
        NEW,
        _activate_with_peft,
        adapter_state,
        build_trainable,
        default_lora_config,
    )

    model, _ = load_model(spec["model"])
    peft_model = build_trainable(model, default_lora_config()).train()

    @contextlib.contextmanager
    def with_peft_walk() -> Any:  # what adapter_state did before the cached switch, line for line
        previous = list(peft_model.base_model.active_adapters)
        grads = {name: p.requires_grad for name, p in peft_model.named_parameters()}
        try:
            _activate_with_peft(peft_model, [], ())
            yield
        finally:
            peft_model.base_model.set_adapter(previous, inference_mode=True)
            for name, p in peft_model.named_parameters():
                p.requires_grad_(grads[name])

    ms = {}
    for name, switch in (("peft set_adapter", with_peft_walk), ("cached LoRA layers", lambda: adapter_state(peft_model, []))):
        times = []
        for _ in range(spec["reps"]):
            start = time.perf_counter()
            with switch():
                pass
            times.append(time.perf_counter() - start)
        ms[name] = 1e3 * statistics.median(times)
    assert list(peft_model.base_model.active_adapters) == [NEW]
    return {"ms": ms, "layers": sum(1 for m in peft_model.modules() if hasattr(m, "lora_A"))}


def report_switch(r: dict[str, Any]) -> str:
    if "error" in r:
        return "switch: error: " + r["error"]
    rows = [[name, f"{value:.2f}"] for name, value in r["ms"].items()]
    return table(["teacher switch (enter + leave)", "ms"], rows) + f"\n({r['layers']} LoRA layers)"


CHILDREN = {"step": child_step, "loss": child_loss, "chat": child_chat, "latency": child_latency, "switch": child_switch}


def run_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    import peft  # noqa: F401  (imported up front: the runtime baseline below includes every library)
    import transformers

    import undial_peft.deploy.stack  # noqa: F401
    import undial_peft.training.forget  # noqa: F401
    import undial_peft.training.trainer  # noqa: F401

    transformers.logging.set_verbosity_error()
    settle()
    # What the interpreter and libraries hold before any model exists; "net" memory is above it.
    spec["runtime_mib"] = 0.0 if harness.device().type == "cuda" else (proc_status_mib("VmRSS") or 0.0)
    result = CHILDREN[spec["section"]](spec)
    result["runtime_mib"] = spec["runtime_mib"]
    print("RESULT " + json.dumps(result), flush=True)


# --- parent: spawn, collect, print ------------------------------------------------------------


def _spawn(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    label = " ".join(f"{k}={spec[k]}" for k in ("section", "variant", "seq", "chunk") if k in spec)
    env = {"OMP_NUM_THREADS": str(spec["threads"])}
    preload = allocator_environment(spec.get("allocator", "system"), os.environ)  # LD_PRELOAD, as `forget --allocator`
    env.update({k: preload[k] for k in ("LD_PRELOAD", RELAUNCHED)} if preload else {})
    if spec.get("variant", "").endswith("_huge"):  # glibc >= 2.35: madvise transparent huge pages for its mmaps
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    return spawn(__file__, spec, timeout, label, env=env)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or key not in a or key not in b or not b[key]:
        return None
    return a[key] / b[key]


def reference_estimate(results: dict[tuple[str, int], dict[str, Any]], seq: int, bytes_per_param: float | None) -> dict[str, Any] | None:
    """The reference design's memory where it was not run (too big): measured bytes/param x parameters."""
    params = next((r["params"] for (v, s), r in results.items() if s == seq and r.get("params")), None)
    if bytes_per_param is None or params is None:
        return None
    return {"net_mib": bytes_per_param * params / 2**20, "estimated": True, "params": params}


def report_step(results: dict[tuple[str, int], dict[str, Any]], seqs: list[int], checks: list[tuple[str, float | None, float]],
                reference_bpp: float | None = None) -> str:
    rows = []
    for seq in seqs:
        sft, undial, cached, ref = (results.get((v, seq)) for v in ("lora_sft", "undial", "undial_cached", "reference"))
        if not ref or "error" in ref:
            ref = reference_estimate(results, seq, reference_bpp)
            if ref is not None:
                results[("reference (estimated)", seq)] = ref
        params = next((r["params"] for (v, s), r in results.items() if s == seq and r.get("params")), None)
        for variant in [*STEP_VARIANTS, "reference (estimated)"]:
            r = results.get((variant, seq))
            if r is None:
                continue
            if "error" in r:
                rows.append([variant, str(seq), "error: " + r["error"][:90], "", "", "", "", "", "", "", ""])
                continue
            rows.append([variant, str(seq), fmt(r.get("step_s"), ".3f"), fmt(r.get("cache_s"), ".3f"),
                         fmt(r.get("net_mib"), ".0f"), fmt(r.get("peak_mib"), ".0f"), fmt(r.get("maxrss_mib"), ".0f"),
                         f"{r.get('trainable', 0) / 1e6:.2f}M", fmt(_ratio(r, sft, "step_s")),
                         fmt(_ratio(r, sft, "net_mib")), fmt(_ratio(r, ref, "net_mib")),
                         fmt(r["net_mib"] * 2**20 / params if params and "net_mib" in r else None, ".1f")])
        checks.append((f"T={seq} step time  UNDIAL / LoRA-SFT", _ratio(undial, sft, "step_s"), 1.40))
        checks.append((f"T={seq} step time  UNDIAL cached / LoRA-SFT", _ratio(cached, sft, "step_s"), 1.05))
        checks.append((f"T={seq} peak mem   UNDIAL / LoRA-SFT", _ratio(undial, sft, "net_mib"), 1.10))
        checks.append((f"T={seq} peak mem   UNDIAL / reference", _ratio(undial, ref, "net_mib"), 0.40))
        for variant, limit in (("undial_gc", 0.25), ("undial_4bit", 0.20), ("undial_4bit_gc", 0.12)):
            checks.append((f"T={seq} peak mem   {variant} / reference", _ratio(results.get((variant, seq)), ref, "net_mib"), limit))
    header = ["variant", "T", "step_s", "cache_s", "peak_MiB", "rss_MiB", "maxrss_MiB", "trainable", "time/sft",
              "peak/sft", "peak/ref", "B/param"]
    return table(header, rows) + "\n(cache_s: the one teacher pass that fills the cache, paid once per run; " \
        "step_s of undial_cached is a step from the second epoch on. B/param: peak bytes per model parameter.)"


def report_loss(results: dict[tuple[str, int, int], dict[str, Any]]) -> str:
    rows = []
    for (variant, seq, chunk), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0], -kv[0][2])):
        full = results.get(("full", seq, 0), {})
        name = f"fused (chunk {chunk})" if variant == "fused" else "full logits"
        n_counted = BATCH * (seq - seq // 2 - 1)
        logits_mib = BATCH * seq * HEAD_VOCAB * 4 / 2**20
        if "error" in r:
            rows.append([name, str(seq), str(n_counted), "error: " + r["error"][:80], "", "", ""])
            continue
        rows.append([name, str(seq), str(n_counted), f"{logits_mib:.0f}", fmt(r["peak_above_mib"], ".0f"),
                     fmt(_ratio(r, full, "peak_above_mib")), fmt(r["time_s"], ".3f")])
    header = ["loss (fwd+bwd from hidden)", "T", "counted", "BxTxV_fp32_MiB", "peak_MiB", "peak/full", "time_s"]
    return table(header, rows)


def report_latency(r: dict[str, Any], checks: list[tuple[str, float | None, float]]) -> str:
    if "error" in r:
        return "latency: error: " + r["error"]
    ms = r["ms"]
    rows = [[name, f"{value:.2f}", f"{value / ms['base']:.2f}", f"{value / ms['single']:.2f}",
             fmt(r["max_diff_vs_stack"].get(name), ".1e")] for name, value in ms.items()]
    checks.append(("latency export / single adapter", ms["export"] / ms["single"], 1.10))
    checks.append(("latency merged / base (want ~1)", ms["merged"] / ms["base"], 1.10))
    header = ["forward (B=1)", "ms", "/base", "/single", "max|logit-stack|"]
    return table(header, rows) + f"\n(8 adapters trained + exported in {r['setup_s']:.0f} s)"


def fit_report(paths: list[Path], extrapolate_to: float) -> str:
    """Bytes per parameter of each design, fitted over the step results of several shapes (``--json``
    files), and the peak it predicts at ``extrapolate_to`` parameters.

    The fit is least squares of peak bytes = a * parameters + b over the measured shapes (a alone
    where one shape measured the design); estimated reference rows are not data and are skipped.
    """
    points: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for path in paths:
        step = json.loads(path.read_text(encoding="utf-8")).get("step", {})
        params = {key.split("@")[1]: r["params"] for key, r in step.items() if r.get("params")}
        for key, r in step.items():
            variant, seq = key.split("@")
            if "net_mib" in r and seq in params:
                points.setdefault((variant, int(seq)), []).append((params[seq], r["net_mib"] * 2**20))
    rows = []
    for (variant, seq), xy in sorted(points.items(), key=lambda kv: (kv[0][1], STEP_VARIANTS.index(kv[0][0]))):
        x = torch.tensor([p for p, _ in xy], dtype=torch.float64)
        y = torch.tensor([b for _, b in xy], dtype=torch.float64)
        if len(xy) > 1:
            design = torch.stack([x, torch.ones_like(x)], 1)  # (shapes, 2)
            slope, intercept = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
        else:
            slope, intercept = float(y[0] / x[0]), 0.0
        measured = "  ".join(f"{p / 1e6:.0f}M:{b / p:.1f}" for p, b in xy)
        rows.append([variant, str(seq), measured, f"{slope:.2f}", f"{intercept / 2**20:.0f}",
                     f"{(slope * extrapolate_to + intercept) / 2**30:.1f}"])
    header = ["design", "T", "measured B/param (params:B/param)", "fit B/param", "fit + MiB", f"at {extrapolate_to / 1e9:.2f}B: GiB"]
    return table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, short sequences, few steps")
    parser.add_argument("--model", default=None, help='"default" (SmolLM2-135M; the default), "tiny", or a model directory / .gguf')
    parser.add_argument("--shape", default=None, choices=["360m", "1b", "8b"],
                        help="a random-weight model with the shape of SmolLM2-360M, Llama-3.2-1B or Llama-3.1-8B")
    parser.add_argument("--reference-bytes-per-param", type=float, default=None,
                        help="where the reference variant is not run (does not fit): its measured bytes/param")
    parser.add_argument("--sections", nargs="+", default=["step", "loss", "chat", "latency", "switch"],
                        choices=["step", "loss", "chat", "latency", "switch"])
    parser.add_argument("--variants", nargs="+", default=list(STEP_VARIANTS), choices=STEP_VARIANTS)
    parser.add_argument("--seqs", nargs="+", type=int, default=None, help="sequence lengths of the step section (128 512)")
    parser.add_argument("--loss-seqs", nargs="+", type=int, default=None, help="T of the loss section (128 512 1024)")
    parser.add_argument("--loss-chunks", nargs="+", type=int, default=None, help="fused chunk sizes (1024 256; quick 1024)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    parser.add_argument("--cpu-mmap-threshold", type=int, default=None,
                        help="UndialConfig.cpu_mmap_threshold of the UNDIAL variants (default: its default, 0)")
    parser.add_argument("--allocator", choices=[a for a in ALLOCATORS if a != "auto"], default="system",
                        help="every child's memory allocator (LD_PRELOAD, as `forget --allocator`; default glibc's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per child before it is killed")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--fit", type=Path, nargs="+", default=None,
                        help="no run: fit bytes/param per design over these --json results of several shapes")
    parser.add_argument("--extrapolate", type=float, default=8.03e9, help="parameters to extrapolate the fit to (8B shape)")
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0
    if args.fit:
        print(fit_report(args.fit, args.extrapolate))
        return 0

    quick = args.quick
    seqs = args.seqs or ([64] if quick else [128, 512])
    loss_seqs = args.loss_seqs or ([64, 128] if quick else [128, 512, 1024])
    loss_chunks = args.loss_chunks or ([1024] if quick else [1024, 256])
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    steps = args.steps if args.steps is not None else (2 if quick else 5)
    common = {"threads": args.threads, "cpu_mmap_threshold": args.cpu_mmap_threshold, "allocator": args.allocator}
    checks: list[tuple[str, float | None, float]] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_name = args.shape or args.model or ("tiny" if quick else "default")
        model = model_dir(args.model or ("tiny" if quick else "default"), args.shape, Path(tmp))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"model={model_name} device={device} threads={args.threads} "
              f"batch={BATCH} warmup={warmup} timed={steps} allocator={args.allocator}", flush=True)
        outputs = []
        if "step" in args.sections:
            results = {}
            for seq in seqs:
                for variant in args.variants:
                    spec = {**common, "section": "step", "variant": variant, "seq": seq, "batch": BATCH,
                            "model": model, "warmup": warmup, "steps": steps}
                    results[(variant, seq)] = _spawn(spec, args.timeout)
            raw["step"] = {f"{v}@{s}": r for (v, s), r in results.items()}
            outputs.append(report_step(results, seqs, checks, args.reference_bytes_per_param))
        if "loss" in args.sections:
            results = {}
            for seq in loss_seqs:
                for variant, chunk in [("full", 0), *(("fused", c) for c in loss_chunks)]:
                    spec = {**common, "section": "loss", "variant": variant, "seq": seq, "chunk": chunk,
                            "batch": BATCH, "hidden": HEAD_HIDDEN, "vocab": HEAD_VOCAB}
                    results[(variant, seq, chunk)] = _spawn(spec, args.timeout)
            raw["loss"] = {f"{v}@{s}/{c}": r for (v, s, c), r in results.items()}
            outputs.append(report_loss(results))
        if "chat" in args.sections:
            results = {variant: _spawn({**common, "section": "chat", "variant": variant, "model": model,
                                        "warmup": warmup, "steps": steps}, args.timeout) for variant in ("once", "whole")}
            raw["chat"] = results
            outputs.append(report_chat(results, checks))
        if "latency" in args.sections:
            spec = {**common, "section": "latency", "model": model, "adapters": 8, "seq": 128,
                    "warmup": 2 if quick else 3, "reps": 5 if quick else 20}
            result = _spawn(spec, args.timeout)
            raw["latency"] = result
            outputs.append(report_latency(result, checks))
        if "switch" in args.sections:
            result = _spawn({**common, "section": "switch", "model": model, "reps": 20 if quick else 50}, args.timeout)
            raw["switch"] = result
            outputs.append(report_switch(result))
    print("\n\n".join(outputs))
    if checks:
        note = " (tiny model: per-step overhead dominates; the targets are for the full run)" if model_name == "tiny" else ""
        print("\ntargets" + note + ":")
        for name, value, limit in checks:
            verdict = "n/a" if value is None else ("ok" if value <= limit else "MISSED")
            print(f"  {name:<40} {fmt(value):>6}  (<= {limit:.2f})  {verdict}")
    if any("error" in r for r in [*raw.get("step", {}).values(), *raw.get("loss", {}).values()]):
        print("\nsome measurements failed; see the error cells", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
