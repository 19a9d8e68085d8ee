"""What one UNDIAL training step costs, against plain LoRA SFT and the deep-copy reference design.

Every measurement runs in its own process (this script re-invoked with ``--child``), so a
variant's peak memory is its own. Three sections, each printed as one table:

step     one optimizer step on random token ids (batch 4; labels on the second half), per variant:
           lora_sft       plain LoRA SFT (r=8, all-linear): NLL from ``model(labels=...)``
           undial         `adapters.build_trainable` + `UndialTrainer.compute_loss` (fused head), as trained
           undial_full    the same with ``loss_chunk_size=0``: full (B, T, V) fp32 logits
           undial_gc      UNDIAL with gradient checkpointing (activations recomputed in backward)
           reference      what public implementations do: deep-copied frozen teacher, FULL fine-tuning,
                          `undial_loss` on full logits
         Median step time after warm-up, and peak memory. CPU: ``rss`` is the process's peak RSS
         (VmHWM) from the first training step on; ``peak`` (the ratios use it) is that minus the RSS
         of the interpreter and libraries before any model existed, i.e. model + optimizer +
         activations, comparable to the CUDA number; ``maxrss`` is ``ru_maxrss`` of the whole
         child, model loading included. CUDA: ``peak`` is ``torch.cuda.max_memory_allocated``.
loss     `undial_loss_from_hidden` vs `undial_loss` on full logits, forward + backward from hidden
         states (B=4, H=576, V=49152: SmolLM2's head), at several T: peak memory above the inputs.
latency  forward latency (batch 1, seq 128) of the base, one adapter, a stack of 8 adapters attached
         as is, the 8 exported as ONE adapter (`stack.export_stack`), and the 8 merged into the base.
         The 8 adapters are trained with `forget` for one step each on the packaged demo facts.

Targets (checked at the end): step time UNDIAL / LoRA-SFT <= 1.40, peak memory UNDIAL / LoRA-SFT
<= 1.10 and UNDIAL / reference <= 0.35; latency export / single <= 1.10 and merged / base ~ 1.

Commands (from the repository root)::

    python examples/benchmarks/step_cost.py                      # full: SmolLM2-135M, T=128 and 512 (~20-30 min on 2 cores)
    python examples/benchmarks/step_cost.py --quick --threads 1  # smoke run: tiny random Llama (~2-3 min)
    python examples/benchmarks/step_cost.py --sections step --seqs 128
    python examples/benchmarks/step_cost.py --sections loss latency --json cost.json
    python examples/benchmarks/step_cost.py --model path/to/model_dir --threads 8

Run it alone on the machine: other processes inflate the times (memory is not affected).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib.resources
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import torch
from harness import fmt, random_batch, spawn, sync

STEP_VARIANTS = ("lora_sft", "undial", "undial_full", "undial_gc", "reference")
BATCH, BETA, LR = 4, 10.0, 1e-4
HEAD_HIDDEN, HEAD_VOCAB = 576, 49152  # SmolLM2-135M's LM head

# --- memory and timing helpers (run in the child) ---------------------------------------------


def _proc_status_mib(field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _settle() -> None:
    """Free what setup left behind, so the peak measured next is the step's own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory from `reset()` on: CUDA allocator peak, or the process's peak RSS (VmHWM).

    Writing "5" to /proc/self/clear_refs resets VmHWM (Linux >= 4.0); where that is refused the
    peak falls back to ``ru_maxrss``, which also counts model loading (``reset_ok`` says which).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset_ok = False

    def current(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        return _proc_status_mib("VmRSS") or 0.0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.reset_ok = True
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _proc_status_mib("VmHWM")
        return hwm if self.reset_ok and hwm is not None else _maxrss_mib()


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- step variants (child) --------------------------------------------------------------------


def _optimizer(args: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer the Trainer would build (AdamW, fused where available), for every variant alike."""
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, None)
    return cls(params, **kwargs)


def build_step(variant: str, model: torch.nn.Module, workdir: str) -> tuple[Any, torch.nn.Module]:
    """A closure running one full training step of ``variant`` on a batch; returns (step, trained model)."""
    from peft import get_peft_model

    from undial_peft import loss as L
    from undial_peft.adapters import build_trainable, default_lora_config
    from undial_peft.config import UndialConfig
    from undial_peft.trainer import UndialTrainer

    torch.manual_seed(0)  # same LoRA A initialisation for every LoRA variant
    args = UndialConfig(output_dir=workdir, beta=BETA, learning_rate=LR)
    if variant == "lora_sft":
        peft_model = get_peft_model(model, default_lora_config()).train()
        optimizer = _optimizer(args, [p for p in peft_model.parameters() if p.requires_grad])

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return peft_model(**batch).loss  # transformers' causal-LM NLL over (B, T, V) logits

        trained = peft_model
    elif variant in ("undial", "undial_full", "undial_gc"):
        chunk = 0 if variant == "undial_full" else args.loss_chunk_size
        args = UndialConfig(output_dir=workdir, beta=BETA, learning_rate=LR, loss_chunk_size=chunk)
        # undial_gc: gradient checkpointing, the setting for memory-bound runs (activations dominate at 135M)
        peft_model = build_trainable(model, default_lora_config(), gradient_checkpointing=variant == "undial_gc").train()
        trainer = UndialTrainer(model=peft_model, args=args)
        optimizer = trainer.create_optimizer()

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return trainer.compute_loss(peft_model, batch)  # exactly the training loss

        trained = peft_model
    elif variant == "reference":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the second full copy
        model.train().requires_grad_(True)  # full fine-tuning
        optimizer = _optimizer(args, list(model.parameters()))

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits  # (B, T, V)
            student_logits = model(**inputs).logits  # (B, T, V)
            return L.undial_loss(student_logits, teacher_logits, batch["labels"], BETA)

        trained = model
    else:
        raise ValueError(f"unknown variant {variant!r}; choose one of {STEP_VARIANTS}")

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, trained


def child_step(spec: dict[str, Any]) -> dict[str, Any]:
    from undial_peft.models import load_model

    device = harness.device()
    model, _ = load_model(spec["model"])
    model.to(device)
    with tempfile.TemporaryDirectory() as workdir:
        step, trained = build_step(spec["variant"], model, workdir)
        batch = random_batch(model.config.vocab_size, spec["batch"], spec["seq"], device)
        params = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        _settle()
        memory = PeakMemory(device)
        before = memory.current()
        memory.reset()
        times, losses = [], []
        for _ in range(spec["warmup"] + spec["steps"]):
            sync()
            start = time.perf_counter()
            losses.append(step(batch))
            sync()
            times.append(time.perf_counter() - start)
        peak = memory.peak()
    return {
        "step_s": statistics.median(times[spec["warmup"]:]),
        "times_s": times,
        "peak_mib": peak,
        "net_mib": peak - spec["runtime_mib"],
        "before_mib": before,
        "maxrss_mib": _maxrss_mib(),
        "peak_reset": memory.reset_ok,
        "trainable": params,
        "loss": losses[0],
    }


# --- loss-only memory (child) -----------------------------------------------------------------


def child_loss(spec: dict[str, Any]) -> dict[str, Any]:
    from undial_peft import loss as L

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
    _settle()
    memory = PeakMemory(device)
    before = memory.current()
    memory.reset()
    sync()
    start = time.perf_counter()
    run()
    sync()
    elapsed = time.perf_counter() - start
    return {"time_s": elapsed, "peak_above_mib": memory.peak() - before, "peak_reset": memory.reset_ok}


# --- inference latency (child) ----------------------------------------------------------------


def _demo_rows() -> list[dict[str, Any]]:
    text = importlib.resources.files("undial_peft").joinpath("data/demo_facts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def make_adapters(model: Any, tokenizer: Any, workdir: Path, count: int) -> list[Path]:
    """``count`` chained forget adapters, one `forget` step each on two demo facts (values do not matter)."""
    from undial_peft.api import forget
    from undial_peft.config import UndialConfig

    rows = _demo_rows()
    config = UndialConfig(max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1000,
                          disable_tqdm=True)
    stack: list[Path] = []
    for index in range(count):
        data = [rows[(2 * index + j) % len(rows)] for j in range(2)]
        stack.append(forget(model, data, workdir / f"req-{index:03d}", config=config, stack=stack, tokenizer=tokenizer))
    return stack


def child_latency(spec: dict[str, Any]) -> dict[str, Any]:
    from undial_peft.models import load_model
    from undial_peft.stack import attach, export_stack

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


CHILDREN = {"step": child_step, "loss": child_loss, "latency": child_latency}


def run_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    import peft  # noqa: F401  (imported up front: the runtime baseline below includes every library)
    import transformers

    import undial_peft.api  # noqa: F401
    import undial_peft.stack  # noqa: F401
    import undial_peft.trainer  # noqa: F401

    transformers.logging.set_verbosity_error()
    _settle()
    # What the interpreter and libraries hold before any model exists; "net" memory is above it.
    spec["runtime_mib"] = 0.0 if harness.device().type == "cuda" else (_proc_status_mib("VmRSS") or 0.0)
    result = CHILDREN[spec["section"]](spec)
    result["runtime_mib"] = spec["runtime_mib"]
    print("RESULT " + json.dumps(result), flush=True)


# --- parent: spawn, collect, print ------------------------------------------------------------


def _spawn(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    label = " ".join(f"{k}={spec[k]}" for k in ("section", "variant", "seq", "chunk") if k in spec)
    return spawn(__file__, spec, timeout, label, env={"OMP_NUM_THREADS": str(spec["threads"])})


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or key not in a or key not in b or not b[key]:
        return None
    return a[key] / b[key]


def report_step(results: dict[tuple[str, int], dict[str, Any]], seqs: list[int], checks: list[tuple[str, float | None, float]]) -> str:
    rows = []
    for seq in seqs:
        sft, undial, ref = (results.get((v, seq)) for v in ("lora_sft", "undial", "reference"))
        for variant in STEP_VARIANTS:
            r = results.get((variant, seq), {})
            if "error" in r:
                rows.append([variant, str(seq), "error: " + r["error"][:90], "", "", "", "", "", ""])
                continue
            rows.append([variant, str(seq), fmt(r.get("step_s"), ".3f"), fmt(r.get("net_mib"), ".0f"),
                         fmt(r.get("peak_mib"), ".0f"), fmt(r.get("maxrss_mib"), ".0f"),
                         f"{r.get('trainable', 0) / 1e6:.2f}M", fmt(_ratio(r, sft, "step_s")),
                         fmt(_ratio(r, sft, "net_mib")), fmt(_ratio(r, ref, "net_mib"))])
        checks.append((f"T={seq} step time  UNDIAL / LoRA-SFT", _ratio(undial, sft, "step_s"), 1.40))
        checks.append((f"T={seq} peak mem   UNDIAL / LoRA-SFT", _ratio(undial, sft, "net_mib"), 1.10))
        checks.append((f"T={seq} peak mem   UNDIAL / reference", _ratio(undial, ref, "net_mib"), 0.35))
    header = ["variant", "T", "step_s", "peak_MiB", "rss_MiB", "maxrss_MiB", "trainable", "time/sft", "peak/sft", "peak/ref"]
    return table(header, rows)


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


def _tiny_model_dir(workdir: Path) -> str:
    """A small random Llama (word tokenizer over the demo facts) saved to ``workdir``, for --quick."""
    from undial_peft.tiny import tiny_llama, word_tokenizer

    texts = [row["question"] + " " + row["answer"] for row in _demo_rows()]
    tokenizer = word_tokenizer(texts)
    model = tiny_llama(tokenizer, hidden_size=64, num_layers=2)
    model.save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    return str(workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, short sequences, few steps")
    parser.add_argument("--model", default=None, help='"default" (SmolLM2-135M; the default), "tiny", or a model directory / .gguf')
    parser.add_argument("--sections", nargs="+", default=["step", "loss", "latency"], choices=["step", "loss", "latency"])
    parser.add_argument("--variants", nargs="+", default=list(STEP_VARIANTS), choices=STEP_VARIANTS)
    parser.add_argument("--seqs", nargs="+", type=int, default=None, help="sequence lengths of the step section (128 512)")
    parser.add_argument("--loss-seqs", nargs="+", type=int, default=None, help="T of the loss section (128 512 1024)")
    parser.add_argument("--loss-chunks", nargs="+", type=int, default=None, help="fused chunk sizes (1024 256; quick 1024)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per child before it is killed")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0

    quick = args.quick
    seqs = args.seqs or ([64] if quick else [128, 512])
    loss_seqs = args.loss_seqs or ([64, 128] if quick else [128, 512, 1024])
    loss_chunks = args.loss_chunks or ([1024] if quick else [1024, 256])
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    steps = args.steps if args.steps is not None else (2 if quick else 5)
    common = {"threads": args.threads}
    checks: list[tuple[str, float | None, float]] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = model_name = args.model or ("tiny" if quick else "default")
        if model == "tiny":
            model = _tiny_model_dir(Path(tmp))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"model={args.model or ('tiny' if quick else 'default')} device={device} threads={args.threads} "
              f"batch={BATCH} warmup={warmup} timed={steps}", flush=True)
        outputs = []
        if "step" in args.sections:
            results = {}
            for seq in seqs:
                for variant in args.variants:
                    spec = {**common, "section": "step", "variant": variant, "seq": seq, "batch": BATCH,
                            "model": model, "warmup": warmup, "steps": steps}
                    results[(variant, seq)] = _spawn(spec, args.timeout)
            raw["step"] = {f"{v}@{s}": r for (v, s), r in results.items()}
            outputs.append(report_step(results, seqs, checks))
        if "loss" in args.sections:
            results = {}
            for seq in loss_seqs:
                for variant, chunk in [("full", 0), *(("fused", c) for c in loss_chunks)]:
                    spec = {**common, "section": "loss", "variant": variant, "seq": seq, "chunk": chunk,
                            "batch": BATCH, "hidden": HEAD_HIDDEN, "vocab": HEAD_VOCAB}
                    results[(variant, seq, chunk)] = _spawn(spec, args.timeout)
            raw["loss"] = {f"{v}@{s}/{c}": r for (v, s, c), r in results.items()}
            outputs.append(report_loss(results))
        if "latency" in args.sections:
            spec = {**common, "section": "latency", "model": model, "adapters": 8, "seq": 128,
                    "warmup": 2 if quick else 3, "reps": 5 if quick else 20}
            result = _spawn(spec, args.timeout)
            raw["latency"] = result
            outputs.append(report_latency(result, checks))
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
