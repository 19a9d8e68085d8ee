"""Read forget / retain rows and validate them: files (JSONL, JSON, CSV, parquet), Datasets or dicts.

Accepted row shapes (one per row; a file may mix them):
  {"question": q, "answer": a} or {"prompt": q, "completion": a}: loss on the answer tokens only;
  {"text": t}: loss on every token.
A question/answer row may name a ``key``: the part of the answer to forget (FUnDIAL-style). The
UNDIAL adjustment then applies only to the key's tokens; the other answer tokens are distilled
to the teacher unchanged, so shared phrasing ("The capital of ... is") is not unlearned.
Exact duplicate rows are dropped with a warning (they would count twice).

Files are parsed in memory, never through the ``datasets`` cache (which would keep an Arrow copy of
the forget text under ~/.cache); CSV cells are read as text (an answer "1984" or "NA" stays a
string) and an empty cell counts as an absent field, so one file can mix row shapes. Error
messages name the row and the field, never any of its text: they end up in logs.

>>> rows = read_examples([{"question": "Who wrote Hamlet?", "answer": "Shakespeare wrote Hamlet."}])
>>> rows[0].prompt, rows[0].answer
('Who wrote Hamlet?', 'Shakespeare wrote Hamlet.')
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from undial_peft.errors import UndialDataError

logger = logging.getLogger(__name__)

SHAPES = (("question", "answer"), ("prompt", "completion"))


@dataclass(frozen=True)
class Example:
    """One row: ``prompt`` is None for raw text, whose every token counts."""

    prompt: str | None
    answer: str
    key: str | None = None  # substring of the answer whose tokens get the adjustment
    where: str | None = field(default=None, compare=False, repr=False)  # "forget data, f.jsonl line 3", for errors


DataSource = str | Path | datasets.Dataset | Sequence[dict[str, Any]]


def _row_to_example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise UndialDataError(f"{where}: expected a JSON object, got {type(row).__name__}. {_SHAPE_HINT}")
    row = {name: value for name, value in row.items() if value is not None}  # a table's empty cell is None
    for prompt_key, answer_key in SHAPES:
        if prompt_key in row or answer_key in row:
            answer = _string(row, answer_key, where)
            key = _string(row, "key", where) if row.get("key") is not None else None
            if key is not None and key not in answer:
                raise UndialDataError(f"{where}: field 'key' must be a substring of the {answer_key}.")
            return Example(_string(row, prompt_key, where), answer, key, where)
    if "text" in row:
        return Example(None, _string(row, "text", where), where=where)
    raise UndialDataError(f"{where}: no known fields (got {sorted(str(name)[:40] for name in row)[:10]}). {_SHAPE_HINT}")


_SHAPE_HINT = 'Use {"question", "answer"}, {"prompt", "completion"} or {"text"}.'


def _string(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise UndialDataError(f"{where}: field {key!r} is missing. {_SHAPE_HINT}")
    value = row[key]
    if not isinstance(value, str):
        raise UndialDataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise UndialDataError(f"{where}: field {key!r} is empty; remove the row or fill it in.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UndialDataError(f"{where}: field {key!r} is not valid Unicode (a lone surrogate); fix its encoding.") from None
    return value


def _read_rows(source: DataSource) -> Iterable[tuple[str, Any]]:
    """Yield (location, row) pairs so errors can name the row."""
    if isinstance(source, datasets.Dataset):
        yield from ((f"row {i}", row) for i, row in enumerate(source))
        return
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise UndialDataError(f"{path}: no such file; pass a .jsonl, .json, .csv or .parquet file.")
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
        if path.suffix not in readers:
            raise UndialDataError(f"{path}: unknown extension {path.suffix!r}; use .jsonl, .json, .csv or .parquet.")
        if path.stat().st_size == 0:
            raise UndialDataError(f"{path.name}: the file is empty; give at least one row. {_SHAPE_HINT}")
        yield from readers[path.suffix](path)
        return
    if isinstance(source, Sequence):
        yield from ((f"row {i}", row) for i, row in enumerate(source))
        return
    raise UndialDataError(f"unsupported data source {type(source).__name__}; pass a path, a Dataset or a list of dicts.")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path.name} line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise UndialDataError(f"{where}: not UTF-8 text; save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise UndialDataError(f"{where}: invalid JSON ({getattr(err, 'msg', 'nested too deeply')}).") from None
            yield where, row


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array of objects, one object, or JSON Lines saved as .json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UndialDataError(f"{path.name}: not UTF-8 text; save the file as UTF-8.") from None
    except (json.JSONDecodeError, RecursionError) as err:
        if getattr(err, "msg", None) == "Extra data":  # one object per line
            yield from _jsonl_rows(path)
            return
        line = f" line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise UndialDataError(f"{path.name}{line}: invalid JSON ({getattr(err, 'msg', 'nested too deeply')}).") from None
    if isinstance(data, list):
        yield from ((f"{path.name} item {i + 1}", row) for i, row in enumerate(data))
    else:
        yield path.name, data


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Every cell as text; an empty cell is an absent field. A row must have the header's width."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, path.stat().st_size))  # one cell may hold a long text row
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            records = [(reader.line_num, fields) for fields in reader]
    except UnicodeDecodeError:
        raise UndialDataError(f"{path.name}: not UTF-8 text; save the file as UTF-8.") from None
    except csv.Error as err:
        raise UndialDataError(f"{path.name}: not valid CSV ({err}).") from None
    finally:
        csv.field_size_limit(limit)
    if not any(name.strip() for name in header) or len(set(header)) != len(header):
        raise UndialDataError(f"{path.name} line 1: the header must name each column once, e.g. question,answer.")
    for line, fields in records:
        if not any(cell.strip() for cell in fields):
            continue
        if len(fields) != len(header):
            raise UndialDataError(
                f"{path.name} line {line}: {len(fields)} fields but the header has {len(header)}; "
                "quote cells that contain commas."
            )
        yield f"{path.name} line {line}", {name: cell for name, cell in zip(header, fields) if cell != ""}


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for damaged files
        raise UndialDataError(f"{path.name}: not a readable parquet file ({type(err).__name__}).") from None
    yield from ((f"{path.name} row {i + 1}", row) for i, row in enumerate(rows))


def read_examples(source: DataSource, name: str = "forget") -> list[Example]:
    """Read and validate rows; raises `UndialDataError` naming the first bad row."""
    examples: list[Example] = []
    seen: set[Example] = set()
    for where, row in _read_rows(source):
        example = _row_to_example(row, f"{name} data, {where}")
        if example in seen:
            logger.warning("%s data, %s: duplicate row dropped", name, where)
            continue
        seen.add(example)
        examples.append(example)
    if not examples:
        raise UndialDataError(f"{name} data is empty; give at least one row. {_SHAPE_HINT}")
    return examples
