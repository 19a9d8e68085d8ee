"""Score rows in a real llama.cpp: the forget set measured on the GGUF base and LoRA file as served.

llama.cpp runs the base GGUF as it is (its quantised weights and kernels) with the adapter as a GGUF
LoRA file; PyTorch measures a de-quantised float copy. `key_probabilities` sends token ids (encoded
once, by the Hugging Face tokenizer of the same model, so both engines score the same tokens) and
returns per row exp(mean log p) over the row's key tokens, as `training.stopping.key_probabilities`
does in PyTorch.

llama.cpp comes from `llama-cpp-python`, which builds from source. Where this interpreter imports
it, rows are scored in-process; else ``UNDIAL_LLAMA_CPP_PYTHON`` may name another Python that has
it (e.g. a separate environment), and this file runs there as a worker: it needs only numpy and
llama_cpp, never torch or this package (its imports at the top are the standard library's only, so
scripts in that environment may load it by path for `open_llama`).

>>> rows = [{"ids": [1, 5, 9, 4], "positions": [1, 2], "targets": [9, 4], "key": [True, False]}]
>>> key_probabilities("base.gguf", ["adapter.gguf"], rows)  # doctest: +SKIP
[0.0132]
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENV = "UNDIAL_LLAMA_CPP_PYTHON"  # a Python interpreter that imports llama_cpp, when this one does not
INSTALL = ("pip install llama-cpp-python (it builds llama.cpp from source: minutes), or set "
           f"{ENV} to a Python that has it")


def unavailable() -> str | None:
    """Why llama.cpp cannot be run from here, or None when it can (in-process or through ``ENV``)."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return None
    python = os.environ.get(ENV)
    if not python:
        return f"llama-cpp-python is not installed: {INSTALL}"
    if not Path(python).is_file():
        return f"{ENV}={python} is not a file: point it at a Python interpreter that imports llama_cpp"
    return None


def key_probabilities(base: str | Path, loras: Sequence[str | Path], rows: Sequence[dict[str, list]],
                      threads: int | None = None) -> list[float]:
    """Per row: exp(mean log p) of its key tokens in llama.cpp, base ``base`` with the GGUF LoRA files ``loras``.

    A row is ``{"ids": token ids, "positions": index of the logits that predict each answer token,
    "targets": those tokens, "key": per answer token whether it is a key token}`` (`rows_for_llama_cpp`).
    """
    job = {"model": str(base), "loras": [str(p) for p in loras], "rows": list(rows),
           "threads": threads or max(1, os.cpu_count() or 1)}
    if importlib.util.find_spec("llama_cpp") is not None:
        return _score(job)
    reason = unavailable()
    if reason is not None:
        from undial_peft.errors import UndialConfigError

        raise UndialConfigError(reason)
    done = subprocess.run([os.environ[ENV], str(Path(__file__).resolve()), "--worker"], input=json.dumps(job),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        from undial_peft.errors import UndialExportError

        raise UndialExportError(f"llama.cpp ({os.environ[ENV]}) failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout)


def rows_for_llama_cpp(features: Sequence[dict[str, list]]) -> list[dict[str, list]]:
    """Encoded rows (``input_ids``, ``labels``, optional ``beta_weight``) as the worker reads them.

    >>> rows_for_llama_cpp([{"input_ids": [1, 5, 9, 4], "labels": [-100, -100, 9, 4], "beta_weight": [0, 0, 1, 0]}])
    [{'ids': [1, 5, 9, 4], 'positions': [1, 2], 'targets': [9, 4], 'key': [True, False]}]
    """
    out = []
    for row in features:
        answer = [t for t, label in enumerate(row["labels"]) if label != -100 and t > 0]
        weights = row.get("beta_weight")
        key = [bool(weights[t] > 0) for t in answer] if weights is not None else [True] * len(answer)
        out.append({"ids": list(row["input_ids"]), "positions": [t - 1 for t in answer],  # logits at t-1 predict t
                    "targets": [row["input_ids"][t] for t in answer], "key": key if any(key) else [True] * len(answer)})
    return out


def open_llama(model: str, loras: Sequence[str], threads: int, n_ctx: int) -> Any:
    """A ``llama_cpp.Llama`` on ``model`` with every GGUF LoRA file of ``loras`` active at scale 1, logits kept
    for every position. Close it (``.close()``) to free the model and its adapters."""
    import ctypes

    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    adapters = [llama_cpp.llama_adapter_lora_init(llm._model.model, str(path).encode()) for path in loras]
    if any(not adapter for adapter in adapters):
        llm.close()
        raise SystemExit(f"llama.cpp refused an adapter of {list(loras)}")
    if adapters:
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
        scales = (ctypes.c_float * len(adapters))(*[1.0] * len(adapters))
        if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, handles, len(adapters), scales):
            llm.close()
            raise SystemExit(f"llama.cpp could not activate {list(loras)}")
    return llm


def _score(job: dict[str, Any]) -> list[float]:
    """The worker: load the base and adapters in llama.cpp, return each row's key probability."""
    import numpy as np

    width = max((len(row["ids"]) for row in job["rows"]), default=1)
    llm = open_llama(job["model"], job["loras"], job["threads"], n_ctx=max(64, width + 8))
    try:
        out = []
        for row in job["rows"]:
            llm.reset()
            llm.eval(row["ids"])
            logits = np.array(llm.scores[row["positions"]], dtype=np.float64)  # (A, V)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))  # (A, V) log-softmax
            target = logp[np.arange(len(row["targets"])), row["targets"]]  # (A,)
            out.append(float(np.exp(target[np.array(row["key"], dtype=bool)].mean())))
        return out
    finally:
        llm.close()  # frees the adapters with the model


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    json.dump(_score(json.load(sys.stdin)), sys.stdout)
