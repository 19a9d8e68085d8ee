"""UNDIAL training memory and step time, 4-bit (NF4, QLoRA) against bf16, at Llama-3 shapes.

Models are randomly initialised from a ``LlamaConfig`` with the dimensions of Llama-3.2-1B and
Llama-3.1-8B (vocab 128256): nothing is downloaded. Each model is saved once as a random
checkpoint, then every (model, precision) runs in its own process and loads it through
`undial_peft.models.load_model` (4-bit: bitsandbytes NF4 + `prepare_model_for_kbit_training`
via `adapters.build_trainable`, as `forget` does). One step = `UndialTrainer.compute_loss`
(teacher pass with the adapter off, student pass, fused chunked head) + backward + AdamW, on
random token ids with labels on the second half. Reported: weights memory, peak
``torch.cuda.max_memory_allocated`` during the steps, median step time.

The 4-bit process also checks LoRA gradients against the SAME PEFT model whose 4-bit base layers
are swapped for bf16 ``nn.Linear`` holding the dequantised weights (one teacher pass first, as in
training): relative error and cosine of all LoRA gradients; a quantisation kernel with a wrong or
missing backward shows up as a large error (cf. the bitsandbytes CPU repacking pitfall).

Commands (repository root)::

    python examples/benchmarks/gpu_memory.py                   # H200: 1B and 8B, bf16 and 4-bit, seq 1024 (~4-5 min)
    python examples/benchmarks/gpu_memory.py --models 1b       # only the 1B shapes (~1.5 min)
    python examples/benchmarks/gpu_memory.py --toy             # any machine, CPU too: toy shapes, same code path (~1-2 min)
    python examples/benchmarks/gpu_memory.py --batch 8 --gradient-checkpointing --json gpu.json

Needs ~25 GB free disk for the random 8B checkpoint (``--workdir``, default a temp dir).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import torch
from harness import fmt, random_batch, spawn, sync

# Dimensions from the public configs of HuggingFaceTB/SmolLM2-360M, meta-llama/Llama-3.2-1B and
# meta-llama/Llama-3.1-8B.
SHAPES: dict[str, dict[str, Any]] = {
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False},
    "toy": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "tie_word_embeddings": False},
}
BETA = 10.0
GRAD_REL_TOLERANCE = 0.05  # 4-bit vs dequantised-bf16 LoRA gradients: same weights, so only kernel rounding


def _allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def _config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _tokenizer() -> Any:
    """A stand-in tokenizer: batches are random ids, but `load_model` wants one for a directory."""
    from undial_peft.tiny import word_tokenizer

    return word_tokenizer(["random weights random ids"])


# --- children ---------------------------------------------------------------------------------


def save_random(shape: str, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> int:
    """Save a randomly initialised Llama of ``shape`` and a stand-in tokenizer; returns the parameter count."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(harness.device()):  # initialise on the GPU: seconds instead of minutes for 8B
        model = LlamaForCausalLM._from_config(_config(shape), dtype=dtype)
    model.save_pretrained(directory, max_shard_size="4GB")
    _tokenizer().save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def child_make(spec: dict[str, Any]) -> dict[str, Any]:
    """Save a randomly initialised bf16 Llama with the shape's dimensions to ``spec["dir"]``."""
    start = time.perf_counter()
    params = save_random(spec["shape"], spec["dir"])
    return {"params": params, "seconds": time.perf_counter() - start}


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Load (bf16 or 4-bit), build the trainable PEFT model, time UNDIAL steps, optionally check gradients."""
    from undial_peft.models import load_model
    from undial_peft.training.adapters import build_trainable, default_lora_config
    from undial_peft.training.config import UndialConfig
    from undial_peft.training.trainer import UndialTrainer

    device = harness.device()
    four_bit = spec["precision"] == "4bit"
    start = time.perf_counter()
    base, _ = load_model(spec["dir"], load_in_4bit=four_bit, dtype=torch.bfloat16, tokenizer=_tokenizer())
    if not four_bit:
        base.to(device)
    torch.manual_seed(0)
    model = build_trainable(base, default_lora_config(), gradient_checkpointing=spec["gradient_checkpointing"]).train()
    load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as out:
        trainer = UndialTrainer(model=model, args=UndialConfig(output_dir=out, beta=BETA, report_to="none"))
        optimizer = trainer.create_optimizer()
        batch = random_batch(base.config.vocab_size, spec["batch"], spec["seq"], device)
        weights_gib = _allocated_gib()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(spec["warmup"] + spec["steps"]):
            sync()
            t0 = time.perf_counter()
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        result: dict[str, Any] = {
            "load_s": load_s,
            "weights_gib": weights_gib,
            "peak_gib": _peak_gib(),
            "step_s": statistics.median(times[spec["warmup"]:]),
            "tokens_per_s": spec["batch"] * spec["seq"] / statistics.median(times[spec["warmup"]:]),
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }
        if four_bit and spec["check_grads"]:
            del optimizer
            result["grad_check"] = check_four_bit_gradients(trainer, model, batch)
    return result


class DequantisedLinear(torch.nn.Module):
    """A frozen dense stand-in for ``bnb.nn.Linear4bit``: same weights, same dtype handling.

    Like bitsandbytes, it computes in ``compute_dtype`` and returns the input's dtype (the
    norms upcast by ``prepare_model_for_kbit_training`` feed it float32).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", weight.detach().to(compute_dtype))  # (out, in)
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.compute_dtype), self.weight, self.bias).to(x.dtype)


def _lora_grads(trainer: Any, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)  # teacher pass (adapter off, no grad) first, then the student
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def check_four_bit_gradients(trainer: Any, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """LoRA gradients of the 4-bit model vs the same model with dequantised bf16 base layers.

    LoRA B is set to small random values first, so both A and B get gradients (a fresh B = 0
    gives A none). Base weights are dequantised with bitsandbytes' own ``dequantize_4bit``, so
    both models hold the same numbers and only the kernels differ.
    """
    import bitsandbytes as bnb

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.copy_(1e-3 * torch.randn(param.shape, generator=generator).to(param))
    loss4, grads4 = _lora_grads(trainer, model, batch)
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)  # (out, in)
            dense = DequantisedLinear(weight, module.bias, module.compute_dtype or torch.bfloat16)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
            swapped += 1
    loss16, grads16 = _lora_grads(trainer, model, batch)
    a = torch.cat([grads4[k].flatten() for k in sorted(grads16)])
    b = torch.cat([grads16[k].flatten() for k in sorted(grads16)])
    rel = float((a - b).norm() / b.norm().clamp(min=1e-30))
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    worst = max(float((grads4[k] - grads16[k]).norm() / grads16[k].norm().clamp(min=1e-30)) for k in grads16)
    return {"layers_swapped": swapped, "loss_4bit": loss4, "loss_dequant": loss16, "grad_rel_err": rel,
            "grad_cosine": cosine, "worst_tensor_rel_err": worst, "ok": rel <= GRAD_REL_TOLERANCE and swapped > 0}


CHILDREN = {"make": child_make, "train": child_train}


def run_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    import transformers

    transformers.logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    print("RESULT " + json.dumps(CHILDREN[spec["section"]](spec)), flush=True)


# --- parent -----------------------------------------------------------------------------------


def _spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    return spawn(__file__, spec, timeout, f"{spec['section']} {spec['shape']} {spec.get('precision', '')}")


def _over(result: dict[str, Any], bf16: dict[str, Any], key: str) -> float | None:
    return result[key] / bf16[key] if bf16.get(key) and "error" not in bf16 else None


def report(results: dict[tuple[str, str], dict[str, Any]], shapes: list[str], params: dict[str, int]) -> str:
    header = ["model", "params", "precision", "weights_GiB", "peak_GiB", "step_s", "tok/s", "peak/bf16", "time/bf16",
              "grad rel err", "grad cos"]
    rows = []
    for shape in shapes:
        bf16 = results.get((shape, "bf16"), {})
        for precision in ("bf16", "4bit"):
            r = results.get((shape, precision))
            if r is None:
                continue
            if "error" in r:
                rows.append([shape, "", precision, "error: " + r["error"][:100]] + [""] * (len(header) - 4))
                continue
            check = r.get("grad_check", {})
            rows.append([shape, f"{params.get(shape, 0) / 1e9:.2f}B", precision, fmt(r["weights_gib"]),
                         fmt(r["peak_gib"]), fmt(r["step_s"], ".3f"), fmt(r["tokens_per_s"], ".0f"),
                         fmt(_over(r, bf16, "peak_gib")), fmt(_over(r, bf16, "step_s")),
                         fmt(check.get("grad_rel_err"), ".1e") + ("" if not check else " ok" if check["ok"] else " FAIL"),
                         fmt(check.get("grad_cosine"), ".5f")])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["1b", "8b"], choices=["360m", "1b", "8b"])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "4bit"], choices=["bf16", "4bit"])
    parser.add_argument("--toy", action="store_true", help="toy shapes (CPU is fine): checks the script end to end")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (1024; toy 64)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-grad-check", action="store_true", help="skip the 4-bit vs dequantised gradient check")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in the children (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per child")
    parser.add_argument("--workdir", type=Path, default=None, help="where the random checkpoints go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0

    shapes = ["toy"] if args.toy else args.models
    seq = args.seq or (64 if args.toy else 1024)
    if not torch.cuda.is_available() and not args.toy:
        print("no CUDA device: this benchmark is meant for a GPU (peak memory is CUDA's); use --toy to check it on CPU",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device={device} seq={seq} batch={args.batch} warmup={args.warmup} timed={args.steps} "
          f"gradient_checkpointing={args.gradient_checkpointing}", flush=True)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    params: dict[str, int] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for shape in shapes:
            directory = str(Path(tmp) / shape)
            made = _spawn({"section": "make", "shape": shape, "dir": directory, "threads": args.threads}, args.timeout)
            if "error" in made:
                results[(shape, "bf16")] = made
                continue
            params[shape] = made["params"]
            for precision in args.precisions:
                spec = {"section": "train", "shape": shape, "precision": precision, "dir": directory, "seq": seq,
                        "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
                        "gradient_checkpointing": args.gradient_checkpointing, "check_grads": not args.no_grad_check}
                results[(shape, precision)] = _spawn(spec, args.timeout)
    print(report(results, shapes, params))
    checks = [r["grad_check"] for r in results.values() if "grad_check" in r]
    for shape, precision in results:
        check = results[(shape, precision)].get("grad_check")
        if check:
            print(f"{shape} 4-bit vs dequantised bf16 (after a teacher pass): loss {check['loss_4bit']:.5f} vs "
                  f"{check['loss_dequant']:.5f}, LoRA grad rel err {check['grad_rel_err']:.2e} (worst tensor "
                  f"{check['worst_tensor_rel_err']:.2e}), cosine {check['grad_cosine']:.6f}, "
                  f"{check['layers_swapped']} layers -> {'ok' if check['ok'] else 'FAIL'} (<= {GRAD_REL_TOLERANCE})")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        raw = {f"{s}/{p}": r for (s, p), r in results.items()}
        args.json.write_text(json.dumps({"params": params, "results": raw}, indent=2) + "\n", encoding="utf-8")
    failed = any("error" in r for r in results.values()) or any(not c["ok"] for c in checks)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
