"""Read tabular data files into pandas frames that remember where each row came from.

Every loader returns a `Table`: the rows plus a function naming a row the way the user sees it
in their editor (`train.csv line 7`, `train.jsonl line 3`, `train.parquet row 12`), so preflight
errors can point at the exact place to fix.

Whatever the bytes of a file, a reader returns the rows written or raises a `DataError` whose message
is one line naming the file (and line): never another exception (`tests/test_fuzz_loaders.py`).
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import pandas as pd

from tunesmith.errors import DataError, shown

TABLE_SUFFIXES = {".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet", ".pq", ".txt"}



@dataclass
class Table:
    frame: pd.DataFrame
    source: str
    row_label: Callable[[int], str]
    # What reading decided on the user's behalf (e.g. the delimiter it detected), for the run's log.
    notes: list[str] = dataclass_field(default_factory=list)

    def where(self, index: int) -> str:
        return f"{self.source} {self.row_label(index)}"


def _one_line(text: str, limit: int = 300) -> str:
    """A library's error message fit for a one-line problem: whitespace runs collapsed, control characters escaped."""
    return shown(" ".join(str(text).split())[:limit])


def _lines(text: str) -> list[str]:
    """Lines as an editor numbers them: split at \\n, \\r\\n or \\r only (not at U+2028, U+0085, form feeds,
    which `str.splitlines` also takes for line ends and which may sit inside a JSON string or a token)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _decode(path: Path, encoding: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err}); expected a readable file; check its permissions") from None
    # NUL bytes never occur in UTF-8/latin-1 text: the file is binary (a spreadsheet, an archive) or UTF-16.
    # Checked before decoding, so a binary file is not misreported as text in the wrong encoding.
    nul = data.find(b"\x00")
    if nul >= 0 and not encoding.lower().replace("-", "").replace("_", "").startswith(("utf16", "utf32")):
        line = data.count(b"\n", 0, nul) + 1
        raise DataError(
            f"{path}: line {line}: expected a {path.suffix.lstrip('.').upper() or 'text'} text file, found binary data "
            "(NUL bytes); export it as UTF-8 CSV/JSONL (is it a spreadsheet, an archive, or UTF-16? "
            "for UTF-16 text set data.encoding=utf-16)"
        )
    try:
        text = data.decode(encoding)
        text.encode("utf-8")  # a codec such as utf-7 can produce lone surrogates, which no later step can store
    except UnicodeEncodeError as err:
        line = text.count("\n", 0, err.start) + 1
        raise DataError(
            f"{path}: line {line}: expected text, found an unpaired surrogate {ascii(text[err.start])} after decoding as "
            f"{shown(encoding)}; re-save the file as UTF-8, or set data.encoding to the file's real encoding"
        ) from None
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}: line {line}: expected {encoding} text, found byte 0x{data[err.start]:02x} that is not valid {encoding}; "
            f"re-save the file as UTF-8, or set data.encoding (e.g. data.encoding=latin-1)"
        ) from None
    except (LookupError, ValueError):  # ValueError: a NUL in the codec name
        raise DataError(f"data.encoding: unknown encoding '{shown(encoding)}'; use a Python codec name such as utf-8 or latin-1") from None
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL characters; expected a text file (is it binary?). Re-save it as UTF-8 text")
    return text.removeprefix("\ufeff")


@contextmanager
def _csv_field_limit(size: int):
    # The csv module refuses fields over 128 KiB by default; pandas reads them, so line numbers must too.
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, size))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_records(text: str, sep: str):
    """(first line, fields) of each record, as pandas reads them: blank lines skipped, quoted fields may span lines."""
    with _csv_field_limit(len(text) + 1):
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
        previous = 0
        try:
            for row in reader:
                if len(row) > 1 or (row and row[0].strip()):
                    yield previous + 1, row
                previous = reader.line_num
        except csv.Error:
            return  # pandas parsed it; fall back to plain numbering for the rest


def _record_lines(text: str, sep: str) -> list[int]:
    """First line of each data row (the first record is the header)."""
    return [line for line, _ in _csv_records(text, sep)][1:]


def _plain_number(text: str) -> bool:
    """Whether a cell is a number written the way Python writes it back: `7`, `-2`, `0.25`, `1e-05`, not
    `007`, ` 1` or `1.50`, which stay text (a text column of codes or a label spelled `01` must not change)."""
    try:
        return str(int(text)) == text
    except ValueError:
        pass
    try:
        return repr(float(text)) == text
    except ValueError:
        return False


def _kept_digits(text: str, value) -> bool:
    """Whether a number read from `text` keeps every digit of an integer: past the int64/uint64 range pandas
    falls back to floats, and an id such as 20000000000000000001 would come back as 2e+19 (it stays text)."""
    try:
        return int(text) == int(value)
    except ValueError:  # a float written as such ("0.25", "inf"): a float is what it says
        return True


def _too_many_fields(text: str, sep: str) -> str | None:
    """Where the first row with more fields than the header is (pandas names a later line when the first
    such row made it take the first column for an index)."""
    records = _csv_records(text, sep)
    _, header = next(records, (0, []))
    for line, row in records:
        if len(row) > len(header):
            return f"Expected {len(header)} fields in line {line}, saw {len(row)}"
    return None


# Delimiters a header may use instead of the one the suffix implies (.csv: comma; .tsv/.txt: tab).
DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
_PLURAL = {",": "commas", "\t": "tabs", ";": "semicolons", "|": "pipes"}
_KIND = {",": "CSV", "\t": "TSV", ";": "semicolon-separated CSV", "|": "pipe-separated CSV"}
_SNIFF_CHARS = 64 * 1024  # the header and the first lines are enough to tell; the rest need not be parsed twice
_SNIFF_ROWS = 20


def _sample_records(text: str, sep: str) -> list[list[str]]:
    """The header and the first data records of `text` split at `sep` (quotes honoured)."""
    sample = text[:_SNIFF_CHARS]
    if len(text) > _SNIFF_CHARS and "\n" in sample:
        sample = sample[: sample.rindex("\n")]  # no half line at the end of the sample
    records = []
    for _, row in _csv_records(sample, sep):
        records.append(row)
        if len(records) > _SNIFF_ROWS:
            break
    return records


def _header_uses(text: str, sep: str) -> bool:
    """Whether the header splits into two or more columns at `sep`."""
    records = _sample_records(text, sep)
    return bool(records) and len(records[0]) > 1 and any(name.strip() for name in records[0])


def _confirmed(text: str, sep: str) -> bool:
    """Whether `sep` splits the header into columns and the first data lines agree: none has more fields
    than the header, most have as many (a short row is legal; a longer one means `sep` is text there)."""
    records = _sample_records(text, sep)
    if len(records) < 2 or not _header_uses(text, sep):
        return False
    width, rows = len(records[0]), records[1:]
    return all(len(r) <= width for r in rows) and 2 * sum(len(r) == width for r in rows) >= len(rows)


def detect_delimiter(text: str, default: str) -> str:
    """The delimiter to read `text` with: `default` (what the suffix says), unless the header has none of
    it and exactly one other delimiter (tab, semicolon, pipe, comma) splits the header and its first lines
    alike. Counting fields per line, rather than `csv.Sniffer`, keeps the header decisive: Sniffer weighs
    every character's frequency over the sample and may pick a `;` of the prose, or raise on a short file."""
    if _header_uses(text, default):
        return default
    found = [sep for sep in DELIMITERS if sep != default and _confirmed(text, sep)]
    return found[0] if len(found) == 1 else default  # ambiguous: keep the suffix's delimiter


def _other_delimiter_advice(text: str, sep: str) -> str | None:
    """For text that failed to parse at `sep` whose header has none of it but another delimiter: what it
    looks like and how to fix it (None when the header gives no such clue)."""
    if _header_uses(text, sep):
        return None
    others = [other for other in DELIMITERS if other != sep and _header_uses(text, other)]
    if len(others) > 1:
        return (
            f"its header has {' and '.join(_PLURAL[o] for o in others)} but no {_PLURAL[sep]}, so its delimiter is "
            "ambiguous; expected one delimiter between the columns: separate them with one delimiter only"
        )
    if not others:
        return None
    other = others[0]
    name, plural, width = DELIMITERS[other], _PLURAL[other], 0
    looks = f"it looks {name}-separated (its header has {plural}, no {_PLURAL[sep]})"
    for line, row in _csv_records(text, other):
        if not width:
            width = len(row)
        elif len(row) > width:
            return (
                f"{looks}, but line {line} has {len(row)} {name}-separated fields and the header {width}; expected as many "
                f"fields on every line as in the header: quote the fields that contain {plural} on line {line} (or remove "
                f"the stray {name}), and the file is read as {name}-separated"
            )
    return (
        f"{looks}, but most of its first lines have fewer {name}-separated fields than the header; expected as many "
        f"fields on every line as in the header: give every line all its fields, and the file is read as {name}-separated"
    )


def _unparsable(path: Path | str, text: str, sep: str, detail: str) -> str:
    advice = _other_delimiter_advice(text, sep)
    if advice:  # the header says which delimiter the user meant: advice about `sep` would mislead
        return f"{path}: cannot parse as {_KIND[sep]} ({detail}); {advice}"
    return (
        f"{path}: cannot parse as {_KIND[sep]} ({detail}); expected as many fields on every line as in the header; "
        f"quote fields that contain {_PLURAL[sep]} or line breaks"
    )


def read_delimited_text(text: str, source: Path | str, default_sep: str = ",") -> Table:
    """Delimited text (a file's, or stdin's) as a checked Table: read at `default_sep`, or at the delimiter
    its header clearly uses instead (noted in `Table.notes`)."""
    sep = detect_delimiter(text, default_sep)
    table = _checked(_read_delimited(source, text, sep), Path(source))
    if sep != default_sep:
        # Kept on the table; whoever reads it logs it (train's run summary, eval, predict), once.
        table.notes.append(f"{source}: read as {DELIMITERS[sep]}-separated (its header has {_PLURAL[sep]}, no {_PLURAL[default_sep]})")
    return table


def _read_delimited(path: Path | str, text: str, sep: str) -> Table:
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=object, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected a header line and at least one row") from None
    except (pd.errors.ParserError, csv.Error) as err:
        detail = _one_line(err).removeprefix("Error tokenizing data. C error: ")
        raise DataError(_unparsable(path, text, sep, _too_many_fields(text, sep) or detail)) from None
    if not isinstance(frame.index, pd.RangeIndex):
        # Rows with one field more than the header: pandas would silently take the first column for an index.
        detail = _too_many_fields(text, sep) or "more fields than the header"
        raise DataError(_unparsable(path, text, sep, detail))
    # Numbers stay numbers where a whole column is numeric: labels 0/1 and regression targets.
    for column in frame.columns:
        converted = pd.to_numeric(frame[column], errors="coerce")
        present = frame[column].dropna()
        if (
            converted.notna().sum() == len(present) and len(present) and all(_plain_number(v) for v in present)
            and all(_kept_digits(v, converted[i]) for i, v in present.items())
        ):
            frame[column] = converted
    # Header is line 1; a row's line is index + 2 unless blank lines or quoted multi-line fields shift it:
    # the exact line is worked out only when an error needs it.
    lines: list[int] = []

    def row_label(i: int) -> str:
        if not lines:
            lines.extend(_record_lines(text, sep) or [-1])
        return f"line {lines[i] if i < len(lines) and lines[i] > 0 else i + 2}"

    return Table(frame, str(path), row_label)


# A \uD800-\uDFFF escape: JSON may spell a lone surrogate, which pandas and tokenizers cannot store.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _json_loads(text: str, where: str, hint: str):
    """`json.loads`, with the two ways it fails besides a syntax error turned into `DataError`s."""
    try:
        payload = json.loads(text)
    except RecursionError:
        raise DataError(f"{where}: expected JSON nested a few levels deep, found nesting too deep to read; {hint}") from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer with more digits than Python converts (sys.get_int_max_str_digits, 4300)
        raise DataError(f"{where}: expected numbers of ordinary size, found an integer with thousands of digits; {hint}") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(payload, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(
                f"{where}: expected text, found an unpaired surrogate escape (\\u{ord(err.object[err.start]):04x}) that is "
                f"not a character; {hint}"
            ) from None
        except RecursionError:
            pass
    return payload


def _read_jsonl(path: Path, text: str) -> Table:
    records, lines = [], []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = _json_loads(line, f"{path}: line {number}", "fix or remove the line")
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number}: expected one JSON object per line, found invalid JSON ({err.msg}); fix or remove the line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object ({{...}}), found {type(record).__name__}")
        records.append(record)
        lines.append(number)
    if not records:
        raise DataError(f"{path}: no records; expected one JSON object per line")
    return Table(pd.DataFrame.from_records(records), str(path), lambda i: f"line {lines[i]}")


def _read_json(path: Path, text: str) -> Table:
    try:
        payload = _json_loads(text, str(path), "reshape the file into a list of records, or one JSON object per line (.jsonl)")
    except json.JSONDecodeError as err:
        # A .json file holding JSON Lines is common enough to accept.
        if err.msg == "Extra data":
            return _read_jsonl(path, text)
        raise DataError(
            f"{path}: line {err.lineno} column {err.colno}: expected valid JSON, found invalid JSON ({err.msg}); "
            "fix the syntax there, or save one JSON object per line as .jsonl"
        ) from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if isinstance(payload, dict) and all(isinstance(v, list) for v in payload.values()):
        lengths = {len(v) for v in payload.values()}
        if len(lengths) > 1:
            found = ", ".join(f"'{shown(k)}': {len(v)}" for k, v in list(payload.items())[:5])
            raise DataError(
                f"{path}: expected every column list to have the same length (one value per row), found lengths {found}; "
                "make the lists equally long"
            )
        frame = pd.DataFrame(payload)
    elif isinstance(payload, list) and all(isinstance(r, dict) for r in payload):
        frame = pd.DataFrame.from_records(payload)
    else:
        raise DataError(
            f"{path}: expected a list of records ([{{...}}, ...]), {{\"data\": [records]}} or a mapping of columns to lists, "
            f"found {_json_shape(payload)}; reshape the file into one of these"
        )
    return Table(frame, str(path), lambda i: f"record {i + 1}")


def _json_shape(payload) -> str:
    if isinstance(payload, list):
        odd = next((r for r in payload if not isinstance(r, dict)), None)
        return f"a list holding a {type(odd).__name__}" if odd is not None else "a list"
    if isinstance(payload, dict):
        return f"an object with keys {', '.join(map(shown, list(payload)[:5]))}"
    return f"a {type(payload).__name__}"


def _read_parquet(path: Path) -> Table:
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises many types for corrupt files
        detail = _one_line(err)
        raise DataError(f"{path}: cannot read as Parquet ({type(err).__name__}: {detail}); is the file complete?") from None
    return Table(frame, str(path), lambda i: f"row {i + 1}")


def _existing_file(path: str | Path, field: str) -> Path:
    from tunesmith.paths import check_data_path

    path = check_data_path(path, field)
    if path.is_dir():
        raise DataError(f"{field}: '{path}' is a folder but not a dataset saved with `save_to_disk`; point at a file")
    return path


def read_file(path: str | Path, encoding: str = "utf-8", field: str = "data.train_file") -> Table:
    """Read one data file (CSV, TSV, JSON, JSONL, Parquet) into a `Table`."""
    path = _existing_file(path, field)
    suffix = path.suffix.lower()
    if suffix in {".parquet", ".pq"}:
        return _checked(_read_parquet(path), path)
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{field}: '{path}' has suffix '{suffix}'; expected one of .csv .tsv .json .jsonl .parquet")
    text = _decode(path, encoding)
    if suffix in {".jsonl", ".ndjson"}:
        table = _read_jsonl(path, text)
    elif suffix == ".json":
        table = _read_json(path, text)
    else:
        return read_delimited_text(text, path, "\t" if suffix in {".tsv", ".txt"} else ",")
    return _checked(table, path)


def _checked(table: Table, path: Path) -> Table:
    """Refuse tables no task can use: no rows, or column names that cannot be printed on one line."""
    if not len(table.frame):
        raise DataError(f"{path}: no rows; expected a header (or keys) and at least one row of data; add rows or point at another file")
    for column in table.frame.columns:
        name = str(column)
        if "\t" in name and path.suffix.lower() == ".csv":
            raise DataError(
                f"{path}: column name '{shown(name)}' holds tabs; expected comma-separated columns; is it a TSV file? rename it .tsv"
            )
        if any(unicodedata.category(c) == "Cc" for c in name):
            raise DataError(
                f"{path}: column name '{shown(name)}' holds a line break or control character; expected a plain column name; rename the column"
            )
    return table


CONLL_SUFFIXES = {".conll", ".iob", ".iob2", ".bio", ".bioes", ".txt", ".tsv"}


def read_conll(path: str | Path, encoding: str = "utf-8", field: str = "data.train_file") -> Table:
    """CoNLL-style files: one token per line with its fields (tab-separated, else space-separated), a blank
    line between sentences, `-DOCSTART-` lines skipped. One row per sentence: `tokens`, `fields` (every
    column of every token) and `lines` (the line number of every token)."""
    path = _existing_file(path, field)
    text = _decode(path, encoding)
    sentences: list[list[tuple[int, list[str]]]] = []
    current: list[tuple[int, list[str]]] = []
    for number, line in enumerate(_lines(text), start=1):
        parts = [p.strip() for p in line.split("\t")] if "\t" in line else line.split()
        if not line.strip() or parts[0] == "-DOCSTART-":
            if current:
                sentences.append(current)
            current = []
            continue
        current.append((number, parts))
    if current:
        sentences.append(current)
    if not sentences:
        raise DataError(f"{path}: no sentences; expected one token per line with its tag (token<TAB>tag), a blank line between sentences")
    frame = pd.DataFrame(
        {
            "tokens": [[parts[0] for _, parts in s] for s in sentences],
            "fields": [[parts for _, parts in s] for s in sentences],
            "lines": [[number for number, _ in s] for s in sentences],
        }
    )
    starts = [s[0][0] for s in sentences]
    return Table(frame, str(path), lambda i: f"line {starts[i]}")


def read_disk_dataset(path: str | Path) -> dict[str, Table]:
    """A folder written by `datasets.Dataset(Dict).save_to_disk`."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # a half-written or hand-edited folder: JSON, Arrow and file errors
        raise DataError(
            f"{path}: cannot load as a dataset saved with `save_to_disk` ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); expected the folder as `Dataset(Dict).save_to_disk` wrote it — save it again"
        ) from None
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return {name: Table(ds.to_pandas(), f"{path}[{name}]", lambda i: f"row {i + 1}") for name, ds in splits.items()}


def is_disk_dataset(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def read_hub_dataset(name: str, config_name: str | None) -> dict[str, Table]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, config_name)
    except Exception as err:  # offline, unknown name, gated
        raise DataError(
            f"data.dataset_name: cannot load hub dataset '{name}' ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "check the name, go online, or point data.train_file at a local file"
        ) from None
    return {split: Table(ds.to_pandas(), f"{name}[{split}]", lambda i: f"row {i + 1}") for split, ds in loaded.items()}
