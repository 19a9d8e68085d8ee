"""Ten forget requests stacked on a real model, with the defaults: what the stack keeps of what was never asked.

The facts are those of ``examples/two_models.py`` (SmolLM2: ``undial_peft/data/real_facts.jsonl``,
chat questions; Gemma-3-270M: ``examples/data/gemma_facts.jsonl``, completion rows). Whole topics
are never asked (``--never``); the rest, in file order, is cut into ``--requests`` requests of
near-equal size (so most requests hold one topic, and a topic is asked over two requests). Request k
is trained with `forget`'s defaults on top of requests 1..k-1 (active and frozen), without keys or
retain data, as an operator would send it. After each request the stack as deployed (`attach`) is
measured: the hand key's probability (x its value before any request) of every request so far and
of every never-asked topic. At the end the stack is exported as ONE adapter, exactly and with
``--max-rank`` 16 and 32 (SVD), and each export is measured the same way.

    python examples/ten_requests.py --model default --out runs/ten-smollm2.json       # ~25 min on 2 cores
    python examples/ten_requests.py --model gemma3-270m --out runs/ten-gemma.json     # ~30 min
    python examples/ten_requests.py --model default --set guard_teacher=base         # the guard anchored on the base
    python examples/ten_requests.py --model default --requests 3 --budgets            # a short check
    python examples/ten_requests.py --model gemma3-270m --first 4 --budgets           # the first four of the ten
    python examples/ten_requests.py --model gemma3-270m --set guard_weight=3          # another setting

    python examples/ten_requests.py --split runs/ten-gemma.json                       # never-asked rows, split

``--split`` reads a saved run: each never-asked topic after the last request, split into the rows whose
key an asked answer also says (Gemma-3's "The Eiffel Tower is located in the city of" -> " Paris", forgotten
as France's capital) and the rest: what a request took on purpose, and what it took beside.

Printed: one line per request (its own figure, the worst earlier request, each never-asked topic, the
greedy answers that still say their key: of the asked rows that said it before, and of the never-asked
rows now / before; steps, wall time of the `forget` call), then one line per export.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from two_models import facts, keyed, settings_from

from undial_peft import UndialConfig, attach, forget
from undial_peft.deploy.manifest import read_manifest
from undial_peft.deploy.stack import export_stack
from undial_peft.models import load_model
from undial_peft.training.silence import answers_end_at_newline, named_rows, says
from undial_peft.training.stopping import key_probabilities
from undial_peft.utils.cpu_memory import ALLOCATORS, relaunch_under
from undial_peft.utils.tables import align

# Topics never asked, per model: whole relations (at least 8 facts each) that no request touches.
NEVER = {"default": ["capitals", "authors", "landmarks"], "gemma3-270m": ["authors", "currencies", "landmarks"]}


def key_probability(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> np.ndarray:
    """(N,) hand-key probability per row, exp mean log p over the key's tokens, in the auto format."""
    return key_probabilities(model, keyed(tokenizer, rows), tokenizer.pad_token_id).numpy()


def says_key(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> np.ndarray:
    """(N,) whether the greedy answer to each row's prompt holds its hand key (as `forget`'s silence check:
    a completion model's answer ends at its first newline)."""
    named, _ = named_rows(model, tokenizer, keyed(tokenizer, rows), answers_end_at_newline("auto", tokenizer))
    said = np.zeros(len(rows), dtype=bool)
    said[[n.row for n in named]] = True
    return said


def asked_rows(rows: list[dict[str, str]], never: list[str]) -> list[int]:
    """Indices of the rows of asked topics, topic by topic in order of first appearance."""
    order = list(dict.fromkeys(r["topic"] for r in rows))
    return sorted((i for i, r in enumerate(rows) if r["topic"] not in never), key=lambda i: order.index(rows[i]["topic"]))


def requests(rows: list[dict[str, str]], never: list[str], count: int) -> list[list[int]]:
    """Row indices of each request: the rows of asked topics, topic by topic (in order of first appearance),
    in ``count`` near-equal parts."""
    asked = asked_rows(rows, never)
    if len(asked) < count:
        raise SystemExit(f"{len(asked)} asked rows cannot make {count} requests: never-ask fewer topics")
    return [part.tolist() for part in np.array_split(np.array(asked), count)]


def as_request(model_name: str, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Plain rows as a user writes them: question/answer for the chat model, prompt/completion for the base one."""
    if model_name == "default":
        return [{"question": r["prompt"], "answer": r["answer"]} for r in rows]
    return [{"prompt": r["prompt"], "completion": r["answer"]} for r in rows]


def figures(p: np.ndarray, before: np.ndarray, rows: list[dict[str, str]], parts: list[list[int]],
            never: list[str], said: np.ndarray, said_before: np.ndarray) -> dict[str, Any]:
    """x-before per request (mean key probability after / before) and per never-asked topic; greedy answers
    that say their key: per request (those that did before), and per never-asked topic (now / before)."""
    topic = np.array([r["topic"] for r in rows])
    return {"requests": [float(p[i].mean() / before[i].mean()) for i in parts],
            "never": {t: float(p[topic == t].mean() / before[topic == t].mean()) for t in never},
            "said_requests": [int((said[i] & said_before[i]).sum()) for i in parts],
            "said_never": {t: [int(said[topic == t].sum()), int(said_before[topic == t].sum())] for t in never}}


def measure_stack(base: Any, tokenizer: Any, stack: list[Path], rows: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Key probability and greedy says-the-key of every row, with ``stack`` attached as served."""
    model = attach(base, stack, tokenizer=tokenizer)
    try:
        return key_probability(model, tokenizer, rows), says_key(model, tokenizer, rows)
    finally:
        model.unload()


def run(model_name: str, count: int, never: list[str], budgets: list[int], work: Path,
        settings: dict[str, Any] | None = None, first: int | None = None) -> dict[str, Any]:
    rows = facts(model_name)
    unknown = sorted(set(never) - {r["topic"] for r in rows})
    if unknown:
        raise SystemExit(f"--never {unknown}: no such topic in the facts of {model_name}")
    parts = requests(rows, never, count)[:first]  # the same cut as all ``count``; only the first requests run
    base, tokenizer = load_model(model_name)
    before, said_before = key_probability(base, tokenizer, rows), says_key(base, tokenizer, rows)
    stack: list[Path] = []
    result: dict[str, Any] = {"model": model_name, "never": never, "sizes": [len(p) for p in parts], "after": [],
                              "settings": settings or {}, "before": before.tolist(), "said_before": said_before.tolist()}
    for k, part in enumerate(parts):
        start = time.perf_counter()
        path = forget(base, as_request(model_name, [rows[i] for i in part]), work / f"req-{k + 1:02d}",
                      config=UndialConfig(disable_tqdm=True, **(settings or {})), stack=list(stack), tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        stack.append(path)
        manifest = read_manifest(path)
        p, said = measure_stack(base, tokenizer, stack, rows)
        result["last"] = p.tolist()  # per row, after the latest request: which facts of a topic fell
        row = {**figures(p, before, rows, parts[: k + 1], never, said, said_before),
               "seconds": seconds, "steps": manifest["metrics"]["steps"], "stopped": manifest["stopping"]["stopped"],
               "silence": manifest["stopping"].get("silence"), "topics": sorted({rows[i]["topic"] for i in part})}
        result["after"].append(row)
        print(f"[{model_name}] request {k + 1}: {json.dumps(row)}", flush=True)
    result["exports"] = {}
    for budget in [None, *budgets]:
        name = "exact" if budget is None else f"max-rank {budget}"
        path = export_stack(base, stack, work / f"export-{budget or 'exact'}", tokenizer=tokenizer, max_rank=budget)
        rank = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))["r"]
        p, said = measure_stack(base, tokenizer, [path], rows)
        result["exports"][name] = {**figures(p, before, rows, parts, never, said, said_before), "rank": rank}
        print(f"[{model_name}] export {name}: {json.dumps(result['exports'][name])}", flush=True)
    return result


def table(result: dict[str, Any]) -> str:
    never = result["never"]
    lines = [["after", "topics", "this request", "worst earlier", *never, "asked, said", "never, said", "steps", "wall"]]

    def said(row: dict[str, Any]) -> list[str]:  # greedy answers still saying a key: asked so far; never-asked now/before
        now, then = (sum(row["said_never"][t][i] for t in never) for i in (0, 1))
        return [str(sum(row["said_requests"])), f"{now}/{then}"]

    for k, row in enumerate(result["after"]):
        earlier = max(row["requests"][:-1], default=None)
        lines.append([f"request {k + 1}", "+".join(row["topics"]), f"{row['requests'][-1]:.2f}",
                      "-" if earlier is None else f"{earlier:.2f}", *(f"{row['never'][t]:.2f}" for t in never),
                      *said(row), f"{row['steps']} ({row['stopped']})", f"{row['seconds']:.0f} s"])
    for name, row in result["exports"].items():
        lines.append([f"export {name}", f"rank {row['rank']}", f"{min(row['requests']):.2f}-{max(row['requests']):.2f}",
                      "", *(f"{row['never'][t]:.2f}" for t in never), *said(row), "", ""])
    return "\n".join(align(lines))


def split(result: dict[str, Any]) -> str:
    """Per never-asked topic, after the last request (x before): all rows, the rows whose key an asked row's
    answer says as a word (`silence.says`), and the rest, with the lowest row of the rest."""
    rows, never = facts(result["model"]), result["never"]
    asked = asked_rows(rows, never)[: sum(result["sizes"])]  # the requests that ran, cut as `requests` cuts them
    before, last = np.array(result["before"]), np.array(result["last"])

    def x(ii: list[int]) -> str:
        return f"{last[ii].mean() / before[ii].mean():.2f} ({len(ii)})" if ii else "- (0)"

    lines = [["never asked", "all rows", "key said by an asked answer", "the rest", "the rest: lowest row"]]
    for t in never:
        idx = [i for i, r in enumerate(rows) if r["topic"] == t]
        shared = [i for i in idx if any(says(rows[j]["answer"], rows[i]["key"]) for j in asked)]
        rest = [i for i in idx if i not in shared]
        lowest = f"{min(last[i] / before[i] for i in rest):.2f}" if rest else "-"
        lines.append([t, x(idx), x(shared) + "".join(f" {rows[i]['key']}" for i in shared), x(rest), lowest])
    return "\n".join(align(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", choices=sorted(NEVER))
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--first", type=int, default=None,
                        help="run only the first N of the --requests requests (cut as for all of them)")
    parser.add_argument("--never", nargs="+", default=None, help="topics no request asks (default: per model)")
    parser.add_argument("--budgets", type=int, nargs="*", default=[16, 32], help="--max-rank exports to measure")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="UndialConfig fields for every request, e.g. --set guard_weight=3 (values read as JSON)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocator", choices=ALLOCATORS, default="auto", help="as `forget --allocator` (docs/cost.md)")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--split", default=None, metavar="JSON",
                        help="print a saved run's never-asked topics split by whether an asked answer says their key")
    args = parser.parse_args()
    if args.split:
        print(split(json.loads(Path(args.split).read_text(encoding="utf-8"))))
        return
    relaunch_under(args.allocator)  # as the command line runs: tcmalloc where installed
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ten-requests-") as work:
        result = run(args.model, args.requests, args.never or NEVER[args.model], args.budgets, Path(work),
                     settings_from(args.set), args.first)
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
