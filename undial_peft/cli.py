"""``undial-peft``: each verb is a thin call into the library.

    undial-peft demo
    undial-peft forget --model default --data forget.jsonl --out adapters/req-001 [--stack DIR ...] [--beta 10] [--4bit]
    undial-peft eval --model default [--adapters DIR ...] --forget F [--retain R] [--reference REF.json]
    undial-peft stack list DIR ...
    undial-peft stack export [--model M] [--max-rank R] --out DIR DIR ...
    undial-peft stack export [--model M] --format gguf --out FILE.gguf DIR ...    [--per-request: --out DIR]
    undial-peft stack merge --model M --out DIR DIR ...
    undial-peft stack check [--max-lora-rank 16] DIR ...
    undial-peft bench [--quick] [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from undial_peft.errors import UndialConfigError, UndialError
from undial_peft.evals import MAX_NEW_TOKENS, SPLITS
from undial_peft.utils.tables import dict_rows

# Library modules are imported only after the arguments are parsed (see main), so that argument
# errors answer without training anything.

# The evaluation protocol's constants come from a torch-free module: parsing arguments imports no torch.
EVAL_SPLITS, EVAL_MAX_NEW_TOKENS = SPLITS, MAX_NEW_TOKENS


def _until(value: str) -> dict[str, float | None]:
    """``--until``: "0.2x" (relative to before), "0.05" (absolute), both ("0.2x,0.05"), or "none"."""
    targets: dict[str, float | None] = {"until_ratio": None, "until_prob": None}
    if value.strip().lower() == "none":
        return targets
    for part in value.split(","):
        part = part.strip().lower()
        try:
            targets["until_ratio" if part.endswith("x") else "until_prob"] = float(part.rstrip("x"))
        except ValueError:
            raise UndialConfigError(f"--until {value!r}: use e.g. 0.2x (relative), 0.05 (absolute), 0.2x,0.05 or none.") from None
    return targets


def _forget_config(args: argparse.Namespace) -> Any:
    """The UndialConfig of ``forget``: --config FILE, then the flags given; the rest keeps UndialConfig's defaults."""
    from undial_peft.training.config_flags import config_from_args

    extra: dict[str, Any] = {"activation_checkpointing": args.gradient_checkpointing, "disable_tqdm": args.quiet}
    if args.save_steps:
        extra.update(save_strategy="steps", save_steps=args.save_steps)
    if args.until is not None:
        extra.update(_until(args.until))  # --until names the whole target: a part it leaves out is off
    return config_from_args(args, **extra)


def _forget(args: argparse.Namespace) -> None:
    from peft import LoraConfig

    from undial_peft.deploy.manifest import read_manifest
    from undial_peft.training.forget import forget, preview_keys
    from undial_peft.training.stopping import describe_outcome

    if args.quiet:  # no bars at all: loading, de-quantising and saving a model draw their own, not only training
        import datasets
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # with models._gguf_bar_obeys_progress_switch, GGUF loads too
        datasets.utils.logging.disable_progress_bar()  # benchmark data sets (--data tofu:...) are read with datasets
    config = _forget_config(args)
    if args.show_keys:  # a dry run: key texts go to this terminal only, never to a log or a file
        for number, (source, text) in enumerate(preview_keys(args.model, _source(args.data, args.data_dir), config=config, stack=args.stack,
                                                             force=args.force), 1):
            print(f"row {number} ({source}): {text!r}")
        return
    if args.target_modules == []:
        raise UndialConfigError("--target-modules needs at least one module name (or leave it out for all linear layers).")
    lora = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=args.target_modules or "all-linear")
    retain = _source(args.retain, args.data_dir) if args.retain else None
    path = forget(args.model, _source(args.data, args.data_dir), args.out, config=config, lora=lora, stack=args.stack, retain=retain,
                  load_in_4bit=args.four_bit, overwrite=args.overwrite, force=args.force, resume=args.resume,
                  description=args.description)
    stopping = (read_manifest(path) or {}).get("stopping", {})
    if "forget_after" in stopping:
        print(describe_outcome(stopping))
    print(f"wrote {path}")


def _demo(args: argparse.Namespace) -> None:
    from undial_peft.demo import run_demo

    run_demo(model=args.model, output_dir=args.out, epochs=args.epochs, learning_rate=args.lr, beta=args.beta)


def _source(value: str, data_dir: str | None = None) -> str | list[dict]:
    from undial_peft.data.named import resolve_source

    return resolve_source(value, data_dir)


def _eval(args: argparse.Namespace) -> None:
    import json

    from undial_peft.deploy.manifest import recorded_prompt_format
    from undial_peft.deploy.stack import attach
    from undial_peft.evals.items import read_eval_items
    from undial_peft.evals.report import evaluate, format_table, save_report
    from undial_peft.models import load_model

    if args.attacks is not None and not args.adapters:
        raise UndialConfigError("--attacks measures what comes back against the base: pass the unlearning stack with --adapters.")
    model, tokenizer = load_model(args.model)
    if args.adapters:
        model = attach(model, args.adapters, tokenizer=tokenizer, force=args.force)
    splits = {name: read_eval_items(_source(path, args.data_dir)) for name in EVAL_SPLITS if (path := getattr(args, name))}
    reference = json.loads(open(args.reference, encoding="utf-8").read()) if args.reference else None
    # Asked the way the adapters were trained (their manifests record it) unless told otherwise.
    fmt = args.prompt_format or recorded_prompt_format(args.adapters) or "auto"
    report = evaluate(model, tokenizer, **splits, reference=reference, max_new_tokens=args.max_new_tokens,
                      prompt_format=fmt)
    print(format_table(report))
    if args.attacks is not None:
        from undial_peft.evals.attacks import ATTACKS, format_attacks, run_attacks

        report["attacks"] = run_attacks(model, tokenizer, splits["forget"], args.attacks or ATTACKS, prompt_format=fmt,
                                        related=splits.get("retain"), generate=True, max_new_tokens=args.max_new_tokens)
        print(format_attacks(report["attacks"]))
    if args.out:
        save_report(report, args.out)
        print(f"wrote {args.out}")


def _stack(args: argparse.Namespace) -> None:
    from undial_peft.deploy.stack import export_stack, list_stack, merge_stack

    if args.action == "list":
        print(dict_rows(list_stack(args.dirs)))
        return
    if args.action == "check":
        for directory in args.dirs:
            _print_vllm_check(directory, args.max_lora_rank)
        return
    if not args.out:
        raise UndialConfigError(f"stack {args.action} needs --out DIR.")
    if args.format == "gguf" or args.per_request:
        if args.action != "export" or args.format != "gguf":
            raise UndialConfigError("--per-request and --format gguf go together, with stack export.")
        from undial_peft.deploy.gguf_export import export_gguf, modelfile_path
        from undial_peft.deploy.manifest import recorded_base

        model = args.model if args.model is not None else recorded_base(args.dirs)  # the GGUF base's file is needed
        for path in export_gguf(model, args.dirs, args.out, per_request=args.per_request, force=args.force,
                                overwrite=args.overwrite):
            print(f"wrote {path}")
        if not args.per_request:
            recipe = modelfile_path(args.out)
            print(f"wrote {recipe} (Ollama: ollama create NAME -f {recipe})")
        return
    if args.action == "export":
        path = export_stack(args.model, args.dirs, args.out, force=args.force, overwrite=args.overwrite,
                            max_rank=args.max_rank)
        print(f"wrote {path}")
        _print_vllm_check(path, None)
        return
    path = merge_stack(args.model, args.dirs, args.out, force=args.force, overwrite=args.overwrite)
    print(f"wrote {path}")


def _print_vllm_check(directory: str, max_lora_rank: int | None) -> None:
    """vLLM's verdict on one adapter directory, and the energy kept where it was rank-compressed."""
    import json
    from pathlib import Path

    from undial_peft.deploy.manifest import CONFIG, read_manifest
    from undial_peft.deploy.vllm import check_vllm, vllm_max_lora_rank

    problems = check_vllm(directory, max_lora_rank)
    rank = json.loads((Path(directory) / CONFIG).read_text(encoding="utf-8"))["r"]
    if problems:
        print(f"{directory}: not loadable by vLLM as is: " + "; ".join(problems))
    else:
        print(f"{directory}: vLLM ok (rank {rank}); serve with --enable-lora --max-lora-rank "
              f"{max_lora_rank or vllm_max_lora_rank(rank)}")
    energy = ((read_manifest(directory) or {}).get("serving") or {}).get("energy_kept")
    if energy:
        worst = min(energy, key=energy.get)
        print(f"rank budget: energy kept per module min {energy[worst]:.4f} ({worst}), "
              f"mean {sum(energy.values()) / len(energy):.4f} over {len(energy)} modules (all in undial.json)")


def _bench(args: argparse.Namespace) -> None:
    from undial_peft.bench import main as bench_main

    code = bench_main(args.args)
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from undial_peft.training.config_flags import add_config_flags

    parser = argparse.ArgumentParser(prog="undial-peft", description="Make an LLM forget data with LoRA adapters (UNDIAL).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="offline demo on the embedded SmolLM2-135M-Instruct")
    demo.add_argument("--model", default="default")
    demo.add_argument("--out", default=None, help="adapter directory (default adapters/demo-<time>)")
    demo.add_argument("--epochs", type=float, default=None, help="fixed epochs (default: stop when forgotten)")
    demo.add_argument("--lr", type=float, default=None, help="default: UndialConfig's")
    demo.add_argument("--beta", type=float, default=None, help="default: UndialConfig's")
    _allocator_flag(demo)
    demo.set_defaults(run=_demo)

    forget = verbs.add_parser("forget", help="train one forget adapter")
    forget.add_argument("--model", default="default", help="'default', a model directory or a .gguf file")
    forget.add_argument("--data", required=True, help="forget set: .jsonl/.json/.csv/.parquet, or e.g. tofu:forget10")
    forget.add_argument("--data-dir", default=None, help="local TOFU / MUSE files for tofu:/muse: names (or $UNDIAL_DATA_DIR)")
    forget.add_argument("--out", required=True, help="new adapter directory, e.g. adapters/req-001")
    forget.add_argument("--stack", nargs="*", default=[], metavar="DIR", help="earlier adapters, in order")
    forget.add_argument("--retain", default=None, help="retain set (with --retain-weight > 0)")
    forget.add_argument("--until", default=None, help="stop target: 0.2x (of before), 0.05 (absolute), both, or none")
    forget.add_argument("--show-keys", action="store_true", help="dry run: print each row's key to the terminal, train nothing")
    forget.add_argument("--rank", type=int, default=8, help="LoRA rank (peft LoraConfig.r)")
    forget.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (peft LoraConfig.lora_alpha)")
    forget.add_argument("--target-modules", nargs="*", default=None, help="modules to adapt (default: all linear layers)")
    forget.add_argument("--4bit", dest="four_bit", action="store_true", help="NF4 base via bitsandbytes")
    forget.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    forget.add_argument("--prompt-template", dest="prompt_format", metavar="TEMPLATE", default=None,
                        help="same as --prompt-format with a template holding {prompt}, e.g. 'Question: {prompt}\\nAnswer:'")
    forget.add_argument("--save-steps", type=int, default=0, help="write Trainer checkpoints every N steps")
    forget.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    forget.add_argument("--overwrite", action="store_true")
    forget.add_argument("--force", action="store_true", help="accept a stack that fails soft checks")
    forget.add_argument("--description", default=None, help="what is forgotten, for the model card (not the data)")
    forget.add_argument("--quiet", action="store_true", help="no progress bars (training, model loading and saving)")
    _allocator_flag(forget)
    add_config_flags(forget.add_argument_group("training (UndialConfig fields; --config FILE sets them too)"))
    forget.set_defaults(run=_forget)

    evaluate = verbs.add_parser("eval", help="TOFU-style metrics, printed and saved as JSON")
    evaluate.add_argument("--model", default="default")
    evaluate.add_argument("--adapters", nargs="*", default=[])
    for split in EVAL_SPLITS:
        evaluate.add_argument(f"--{split.replace('_', '-')}", dest=split, default=None,
                              help="data file, demo:forget / demo:keep, or e.g. tofu:forget10_perturbed")
    evaluate.add_argument("--data-dir", default=None, help="local TOFU / MUSE files for tofu:/muse: names (or $UNDIAL_DATA_DIR)")
    evaluate.add_argument("--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS,
                          help=f"greedy answer length for ROUGE (default {EVAL_MAX_NEW_TOKENS}, as TOFU)")
    evaluate.add_argument("--reference", default=None, help="a saved report of a retain-only model")
    evaluate.add_argument("--attacks", nargs="*", default=None, metavar="NAME",
                          help="attacks that try to undo the forgetting (no names: all of relearn, relearn_related,"
                               " quantise_nf4, quantise_int8, paraphrase, few_shot, reveal_prompt, multiple_choice)")
    evaluate.add_argument("--prompt-format", default=None, metavar="FORMAT",
                          help="auto, chat, completion or a template holding {prompt} (default: the adapters' recorded one)")
    evaluate.add_argument("--out", default=None, help="write the report as JSON")
    evaluate.add_argument("--force", action="store_true")
    evaluate.set_defaults(run=_eval)

    stack = verbs.add_parser("stack", help="list, export or merge a stack of adapters")
    stack.add_argument("action", choices=["list", "export", "merge", "check"],
                       help="check: vLLM's single-adapter rules for each DIR")
    stack.add_argument("dirs", nargs="+", metavar="DIR", help="adapter directories, in order")
    stack.add_argument("--model", default=None, help="base model (default: the one the adapters' manifests name)")
    stack.add_argument("--out", default=None)
    stack.add_argument("--overwrite", action="store_true")
    stack.add_argument("--force", action="store_true")
    stack.add_argument("--format", choices=["peft", "gguf"], default="peft",
                       help="export as a peft adapter directory, or a llama.cpp GGUF LoRA (--out FILE.gguf)")
    stack.add_argument("--per-request", action="store_true",
                       help="with --format gguf: one GGUF per adapter in the --out directory (llama.cpp sums them)")
    stack.add_argument("--max-rank", type=int, default=None, metavar="R",
                       help="export: compress each module's summed delta to rank <= R by SVD (exact where it fits)")
    stack.add_argument("--max-lora-rank", type=int, default=None, help="check: the vLLM server's --max-lora-rank")
    stack.set_defaults(run=_stack)

    bench = verbs.add_parser("bench", add_help=False, help="offline benchmark: all methods on fictitious facts (see --help)")
    bench.set_defaults(run=_bench)  # its own options are parsed by undial_peft.bench
    return parser


def _allocator_flag(verb: argparse.ArgumentParser) -> None:
    """``--allocator``: the training verbs run under tcmalloc where it is installed (utils/cpu_memory.py)."""
    from undial_peft.utils.cpu_memory import ALLOCATORS

    verb.add_argument("--allocator", choices=ALLOCATORS, default="auto",
                      help="memory allocator of the process (Linux): auto = tcmalloc where installed (on CPU a "
                           "step's peak -26 to -45%%, time -7 to +10%%: docs/cost.md), else the system's (glibc)")


def _relaunch(allocator: str) -> None:
    """Run this same command again under ``allocator`` (returns where nothing changes), and say which one runs."""
    from undial_peft.utils.cpu_memory import RELAUNCHED, relaunch_under

    relaunch_under(allocator)
    if os.environ.get(RELAUNCHED):
        logging.getLogger("undial_peft.cli").info("memory allocator: %s (--allocator system: the system's)", os.environ[RELAUNCHED])


def _quiet_imports() -> None:
    """Keep the terminal to what a user can act on: silence deprecation and device notices raised
    inside the libraries' own code. (bitsandbytes' 'kernels' notice is filtered where the package
    is imported, see undial_peft/__init__.py, so the library API gets that too.)
    """
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true.*", category=UserWarning)
    # torch's own mkldnn module, imported by bitsandbytes (via peft) through torch._inductor
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one line and exit 2."""
    from_command_line = argv is None  # only a real command is relaunched under another allocator, never a caller's
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_imports()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb == "bench":
        args.args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Our own progress at INFO; other libraries only when they warn (absl logs INFO on import).
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("undial_peft").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if from_command_line and getattr(args, "allocator", "system") != "system":
            _relaunch(args.allocator)
        args.run(args)
    except UndialError as err:  # our own errors name the fix; anything else is a bug: traceback
        print(f"undial-peft: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
