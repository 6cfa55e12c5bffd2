"""Reading user datasets (JSONL or CSV) with errors that name the file, the line and the fix.

Every analysis that accepts a user file reads it through `read_records`, then turns each record
into its own sample type inside `records_to(...)`, so a malformed row is reported as
`data.jsonl, line 7: field 'answer' is missing (expected: ...)` instead of a KeyError deep in a
run. Line numbers are 1-based file lines (a CSV's header is line 1, its first row line 2).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from headlab.errors import InputFileError
from headlab.io import checked_file, iter_lines

T = TypeVar("T")


class DatasetError(InputFileError):
    """A row of a user dataset is malformed; the message names file, line and reason."""

    def __init__(self, path: str | Path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


WHAT = "a UTF-8 .jsonl (one JSON object per line) or .csv dataset"


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each row of a `.jsonl`/`.json` (one object per line) or `.csv` file.

    The file is read one line at a time (`headlab.io.iter_lines`): undecodable bytes, NUL bytes and
    lines longer than `headlab.io.MAX_LINE_BYTES` are errors naming the line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".tsv"):
        checked_file(path, WHAT)
        raise DatasetError(path, None, f"unknown dataset format {suffix!r}; use .jsonl (one JSON object per line) or .csv")
    if suffix in (".jsonl", ".json", ".ndjson"):
        for n, line in iter_lines(path, WHAT):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(path, n, f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
            except RecursionError:
                raise DatasetError(path, n, "JSON nested too deeply; each line must be one flat JSON object") from None
            if not isinstance(record, dict):
                raise DatasetError(path, n, f"expected a JSON object, got {type(record).__name__}")
            yield n, record
        return
    reader = csv.DictReader((line + "\n" for _, line in iter_lines(path, WHAT)), delimiter="\t" if suffix == ".tsv" else ",")
    try:
        if not reader.fieldnames:
            raise DatasetError(path, 1, "the CSV has no header row; the first line must name the columns")
        for record in reader:
            n = reader.line_num
            if None in record:
                raise DatasetError(path, n, f"more values than the {len(reader.fieldnames)} header columns")
            if any(v is None for v in record.values()):
                raise DatasetError(path, n, f"fewer values than the {len(reader.fieldnames)} header columns")
            if not any(v.strip() for v in record.values()):
                continue
            yield n, record
    except csv.Error as e:
        raise DatasetError(path, reader.line_num + 1, f"not a valid CSV row ({e})") from None  # the row being read


def records_to(path: str | Path, convert: Callable[[dict[str, Any]], T]) -> list[T]:
    """Convert every record with `convert`, which raises ValueError/KeyError/TypeError on a bad row."""
    out = []
    for n, record in read_records(path):
        try:
            out.append(convert(record))
        except KeyError as e:
            raise DatasetError(path, n, f"field {e.args[0]!r} is missing (fields present: {sorted(record)})") from None
        except (ValueError, TypeError) as e:
            raise DatasetError(path, n, str(e)) from None
    if not out:
        raise DatasetError(path, None, "the file has no rows")
    return out


def text_field(record: dict[str, Any], name: str) -> str:
    """A required non-empty string field."""
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {name!r} must be a non-empty string, got {value!r}")
    return value
