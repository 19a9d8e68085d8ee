"""The one text-table formatter: every table the CLI, the benchmarks and the reports print.

>>> print("\\n".join(align([["metric", "forget"], ["p", number(0.51234)], ["n", "2"]])))
metric  forget
p       0.5123
n            2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def number(value: Any, spec: str = ".4g") -> str:
    """A cell: ``-`` for None, floats with ``spec``, anything else as text.

    >>> number(None), number("skipped"), number(12345), number(0.123456), number(0.123456, ".3f")
    ('-', 'skipped', '12345', '0.1235', '0.123')
    """
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def align(rows: Sequence[Sequence[str]], *, right: bool = True, sep: str = "  ") -> list[str]:
    """Aligned lines of a table whose first row is the header.

    The first column is left-aligned; the others are right-aligned (numbers) or, with
    ``right=False``, left-aligned (text). Rows may be shorter than the header. Trailing spaces
    are stripped.
    """
    columns = max(len(row) for row in rows)
    widths = [max((len(row[c]) for row in rows if c < len(row)), default=0) for c in range(columns)]

    def line(row: Sequence[str]) -> str:
        cells = [text.ljust(widths[c]) if c == 0 or not right else text.rjust(widths[c]) for c, text in enumerate(row)]
        return sep.join(cells).rstrip()

    return [line(row) for row in rows]


def dict_rows(rows: Sequence[dict[str, Any]], spec: str = ".4g") -> str:
    """A left-aligned table of dict rows; the columns are the keys of the first row.

    >>> print(dict_rows([{"id": "req-1", "p": 0.5}, {"id": "req-22", "p": None}]))
    id      p
    req-1   0.5
    req-22  -
    """
    if not rows:
        return "(empty)"
    keys = list(rows[0])
    return "\n".join(align([keys, *([number(row.get(k), spec) for k in keys] for row in rows)], right=False))
