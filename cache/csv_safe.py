"""CSV cells that a spreadsheet will not run as formulas (CSV injection, OWASP).

It lives in the cache package (the leaf every other package may import) because the rejects
CSV beside a cache is written here; pipeline and stages use the same helper.

A DICOM tag such as ``=HYPERLINK("http://...")`` that reaches predictions.csv or a rejects list
becomes a live formula when someone opens the file in Excel or LibreOffice. Every CSV the
project writes goes through `writer` / `dict_writer`, which prefix a text cell beginning with
``= + - @``, a tab or a carriage return with a single quote, so it is shown as text. Numbers,
including negative ones written as text ("-0.5"), are left as they are.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from typing import IO, Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip() == text and text.lower().lstrip("+-") not in ("inf", "infinity", "nan")


def safe_cell(value: Any) -> Any:
    """`value` unchanged, unless it is text that a spreadsheet would read as a formula: then "'" + text."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _is_number(value):
        return "'" + value
    return value


class _SafeWriter:
    def __init__(self, handle: IO[str], **kwargs):
        self._writer = csv.writer(handle, **kwargs)

    def writerow(self, row: Iterable[Any]):
        return self._writer.writerow([safe_cell(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


class _SafeDictWriter(csv.DictWriter):
    def writerow(self, rowdict: Mapping[str, Any]):
        return super().writerow({k: safe_cell(v) for k, v in rowdict.items()})

    def writerows(self, rowdicts: Iterable[Mapping[str, Any]]) -> None:
        for row in rowdicts:
            self.writerow(row)


def writer(handle: IO[str], **kwargs) -> _SafeWriter:
    """`csv.writer` whose cells go through `safe_cell`."""
    return _SafeWriter(handle, **kwargs)


def dict_writer(handle: IO[str], fieldnames, **kwargs) -> _SafeDictWriter:
    """`csv.DictWriter` whose cells go through `safe_cell`."""
    return _SafeDictWriter(handle, fieldnames, **kwargs)
