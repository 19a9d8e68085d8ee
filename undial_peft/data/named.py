"""TOFU and MUSE splits by name (``tofu:forget10``, ``muse:news/knowmem/forget_qa``).

A name is looked up first in a local folder (``data_dir`` argument, else the ``UNDIAL_DATA_DIR``
environment variable), then on the Hugging Face hub (through `datasets`) when it can be reached.
Local files are parsed in memory, never through the `datasets` cache. Local layout, one file per
split in the hub's own format (``.jsonl``, ``.json`` or ``.parquet``)::

    DATA/tofu/forget10.jsonl                  # locuslab/TOFU, config forget10
    DATA/tofu/world_facts_perturbed.jsonl
    DATA/muse/news/knowmem/forget_qa.jsonl    # muse-bench/MUSE-News, config knowmem, split forget_qa

Rows come back in the field names `undial_peft.evals.items.read_eval_items` and
`undial_peft.data.readers.read_examples` read: TOFU keeps question / answer / paraphrased_answer /
paraphrased_question and renames ``perturbed_answer`` (a list) to ``perturbed_answers``; MUSE
knowmem rows are question / answer, verbmem rows prompt / completion (``prompt`` / ``gt``), and
raw, privleak rows are ``{"text": ...}``. MUSE knowmem, verbmem and privleak rows also name their
``protocol`` (`undial_peft.evals.items.PROTOCOLS`: MUSE's prompt format, generation budget and
length cut), and knowmem rows carry the split's in-context examples as ``few_shot`` (the
``<split>_icl`` split, e.g. forget_qa_icl for forget_qa), which must be present too. Training
(`read_examples`) ignores both fields.

>>> parse_name("tofu:forget10")
DataName(benchmark='tofu', config='forget10', split='train', corpus=None)
>>> parse_name("muse:news/verbmem/forget")
DataName(benchmark='muse', config='verbmem', split='forget', corpus='News')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from undial_peft.errors import UndialDataError

ENV_DATA_DIR = "UNDIAL_DATA_DIR"
PREFIXES = ("tofu:", "muse:")
SUFFIXES = (".jsonl", ".json", ".parquet")
TOFU_HUB = "locuslab/TOFU"
MUSE_HUB = "muse-bench/MUSE-{corpus}"
MUSE_CORPORA = {"news": "News", "books": "Books"}
MUSE_CONFIGS = ("raw", "knowmem", "verbmem", "privleak")


@dataclass(frozen=True)
class DataName:
    """A parsed ``tofu:`` / ``muse:`` name: hub config and split (TOFU has one split, ``train``)."""

    benchmark: str
    config: str
    split: str
    corpus: str | None = None

    @property
    def hub_path(self) -> str:
        return TOFU_HUB if self.benchmark == "tofu" else MUSE_HUB.format(corpus=self.corpus)

    def local_stem(self, root: Path) -> Path:
        if self.benchmark == "tofu":
            return root / "tofu" / self.config
        return root / "muse" / str(self.corpus).lower() / self.config / self.split


def is_data_name(value: Any) -> bool:
    """True for strings this module resolves (``tofu:...`` or ``muse:...``)."""
    return isinstance(value, str) and value.startswith(PREFIXES)


def parse_name(name: str) -> DataName:
    """Split a name into benchmark, config, split; raises `UndialDataError` naming the valid shapes."""
    benchmark, _, rest = name.partition(":")
    if benchmark == "tofu" and rest and "/" not in rest:
        return DataName("tofu", rest, "train")
    parts = rest.split("/")
    if benchmark == "muse" and len(parts) == 3 and parts[0].lower() in MUSE_CORPORA and parts[1] in MUSE_CONFIGS:
        return DataName("muse", parts[1], parts[2], MUSE_CORPORA[parts[0].lower()])
    raise UndialDataError(
        f"{name!r}: expected tofu:<config> (e.g. tofu:forget10, tofu:retain_perturbed) or "
        f"muse:<news|books>/<{'|'.join(MUSE_CONFIGS)}>/<split> (e.g. muse:news/knowmem/forget_qa)."
    )


def _local_file(name: DataName, data_dir: str | Path | None) -> Path | None:
    root = data_dir if data_dir is not None else os.environ.get(ENV_DATA_DIR)
    if not root:
        return None
    stem = name.local_stem(Path(root))
    return next((stem.with_name(stem.name + s) for s in SUFFIXES if stem.with_name(stem.name + s).is_file()), None)


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _local_rows(path: Path) -> list[dict[str, Any]]:
    """A local split's rows, parsed in memory by the readers of `undial_peft.data`.

    Not through ``datasets.load_dataset("json")``: that writes an Arrow copy of the text into the
    datasets cache (~/.cache), which would outlive the forget request.
    """
    from undial_peft.data.readers import _read_rows

    return list(row for _, row in _read_rows(path))


def load_dataset_by_name(name: str, data_dir: str | Path | None = None) -> Any:
    """The split as a `datasets.Dataset`, from the local folder or the hub, in the hub's own fields.

    A local file becomes an in-memory Dataset (no cache file); a hub split is cached by `datasets`
    as usual.

    >>> # load_dataset_by_name("tofu:forget10", "data").column_names  -> ['question', 'answer']
    """
    import datasets

    parsed = parse_name(name)
    local = _local_file(parsed, data_dir)
    if local is not None:
        return datasets.Dataset.from_list(_local_rows(local))
    root = data_dir if data_dir is not None else os.environ.get(ENV_DATA_DIR)
    where = parsed.local_stem(Path(root or "DATA"))
    hint = (
        f"put the split at {where}.jsonl (or .json / .parquet) and pass --data-dir (or set {ENV_DATA_DIR}) to its"
        f" root; on a machine with internet: python -c \"import datasets; datasets.load_dataset("
        f"'{parsed.hub_path}', '{parsed.config}', split='{parsed.split}').to_json('{where}.jsonl')\""
    )
    if _hub_offline():
        raise UndialDataError(f"{name}: not found locally and the hub is switched off (HF_HUB_OFFLINE); {hint}.")
    try:
        return datasets.load_dataset(parsed.hub_path, parsed.config, split=parsed.split)
    except Exception as err:  # no network, unknown config, gated repo: all end in the same advice
        raise UndialDataError(
            f"{name}: not found locally and not loadable from the hub ({type(err).__name__}: {err}); {hint}."
        ) from err


def _convert(parsed: DataName, row: dict[str, Any], few_shot: list[dict[str, str]] | None = None) -> dict[str, Any]:
    if parsed.benchmark == "tofu":
        out = {k: row[k] for k in ("question", "answer", "paraphrased_answer", "paraphrased_question") if k in row}
        if "perturbed_answer" in row:
            perturbed = row["perturbed_answer"]
            out["perturbed_answers"] = [perturbed] if isinstance(perturbed, str) else list(perturbed)
        return out
    if parsed.config == "knowmem":
        out = {"question": row["question"], "answer": row["answer"], "protocol": "muse_knowmem"}
        return {**out, "few_shot": few_shot} if few_shot else out
    if parsed.config == "verbmem":
        return {"prompt": row["prompt"], "completion": row["gt"], "protocol": "muse_verbmem"}
    if parsed.config == "privleak":
        return {"text": row["text"], "protocol": "muse_privleak"}
    return {"text": row["text"]}  # raw: the training corpus, no evaluation protocol


def _icl_name(parsed: DataName) -> str | None:
    """The name of a MUSE knowmem split's in-context examples (forget_qa -> forget_qa_icl), else None."""
    if parsed.benchmark != "muse" or parsed.config != "knowmem" or parsed.split.endswith("_icl"):
        return None
    return f"muse:{str(parsed.corpus).lower()}/knowmem/{parsed.split}_icl"


def load_rows(name: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The split as a list of dicts in this package's field names (see the module docstring).

    >>> # load_rows("tofu:forget10_perturbed", "data")[0]["perturbed_answers"]  -> ['...', '...', ...]
    """
    parsed = parse_name(name)
    local = _local_file(parsed, data_dir)
    # Local rows straight from the file: a Dataset in between would only add a copy.
    rows = _local_rows(local) if local is not None else list(load_dataset_by_name(name, data_dir))
    icl = _icl_name(parsed)
    # MUSE's KnowMem asks each question after these examples; without them the score is not MUSE's.
    few_shot = [{"question": r["question"], "answer": r["answer"]} for r in load_rows(icl, data_dir)] if icl else None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UndialDataError(f"{name}: row {i} is a {type(row).__name__}, not an object. Save the split in the hub's own format.")
        try:
            rows[i] = _convert(parsed, row, few_shot)
        except KeyError as err:
            raise UndialDataError(
                f"{name}: row {i} lacks field {err}; it has {sorted(row)}. Save the split in the hub's own format."
            ) from err
    return rows


def resolve_source(value: str, data_dir: str | Path | None = None) -> str | list[dict[str, Any]]:
    """What a CLI data argument names: a benchmark split (``tofu:forget10``, ``muse:news/knowmem/forget_qa``),
    the demo's packaged facts (``demo:forget`` / ``demo:keep``), or else a path, returned as given.

    >>> len(resolve_source("demo:keep")) > 0, resolve_source("forget.jsonl")
    (True, 'forget.jsonl')
    """
    if is_data_name(value):
        return load_rows(value, data_dir)
    if value.startswith("demo:"):
        from undial_peft.data.packaged import demo_facts

        probes = ("paraphrased_question", "perturbed_answers")  # on the forget facts, for truth ratio and attacks
        rows = [{k: f[k] for k in ("question", "answer", *probes) if k in f} for f in demo_facts() if f["split"] == value[5:]]
        if not rows:
            raise UndialDataError(f"{value}: use demo:forget or demo:keep.")
        return rows
    return value
