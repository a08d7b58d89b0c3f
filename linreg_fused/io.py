"""Reading data sets into float64 columns: CSV, ``.npy``/``.npz`` and Parquet.

    names = column_names("data.csv")                         # the header
    x = read_columns("data.csv", ["temp", "rainfall"])       # (N, 2) float64, every value finite

CSV files have a header row and numbers (quoted or not) separated by
``delimiter`` ("," by default; ";" or "\t" for others). Two parsers read
them, both compiled code and both correctly rounded:

- ``engine="pyarrow"``: pyarrow's multi-threaded CSV reader (the ``arrow``
  extra, or ``pip install pyarrow``), the fastest on large files;
- ``engine="numpy"``: ``numpy.loadtxt``'s C parser, always available;

``engine="auto"`` (the default) takes pyarrow for files over 1 MB when it is
installed, numpy's parser for smaller ones (importing pyarrow costs more than
it saves there). Only the requested columns are converted, so text columns
(ids, names, dates) that a model does not use are fine.

``.npy`` holds one array: 2-D (N, C) with columns named "0" … "C-1", 1-D
with one column "0", or a structured array whose field names are the column
names. ``.npz`` holds arrays of equal length: a 1-D array is a column named
by its key, a 2-D array ``X`` of shape (N, k) gives columns "X[0]" … "X[k-1]".
Parquet (``.parquet``, ``.pq``) needs pyarrow too.

Every problem raises DataError with one line that names the file, the
column and the row (data rows count from 1; the header is not one): a
missing column (with a hint when the header looks separated by another
delimiter), a cell that is not a number, an empty cell, NaN or inf, a row
with too few or too many fields, a folder where a file was expected.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import os
import re
import warnings
from typing import Sequence

import numpy as np

ENGINES = ("auto", "pyarrow", "numpy")
SUFFIXES = (".csv", ".npy", ".npz", ".parquet", ".pq")
ARROW_HINT = "pip install pyarrow (the arrow extra)"
ARROW_MIN_BYTES = 1 << 20  # engine="auto" reads smaller CSV files with numpy


class DataError(ValueError):
    """A data file that cannot be read as numbers; the message says where."""


def _unreadable_is_data_error(function):
    """A file that cannot be read (no permission, an I/O error): one DataError, not a traceback."""

    @functools.wraps(function)
    def read(path, *args, **kwargs):
        try:
            return function(path, *args, **kwargs)
        except OSError as err:
            raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None

    return read


@_unreadable_is_data_error
def column_names(path: str | os.PathLike, *, delimiter: str = ",") -> list[str]:
    """The column names of a data file, in file order (delimiter: of a CSV file)."""
    kind = _kind(path)
    if kind == "csv":
        with _utf8(path):
            return _csv_header(path, delimiter)
    if kind == "npy":
        return _npy_names(path, _load_npy(path))
    if kind == "npz":
        return list(_npz_columns(path))
    return _parquet_schema(path).names


@_unreadable_is_data_error
def read_columns(
    path: str | os.PathLike, names: Sequence[str] | None = None, *, engine: str = "auto", delimiter: str = ","
) -> np.ndarray:
    """The columns ``names`` (default: all) of a data file as an (N, len(names)) float64 array.

    Raises DataError if a column is missing, a selected cell is not a finite
    number, or the file holds no rows. engine: the CSV parser, delimiter: the
    CSV field separator (see above).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '"\r\n':
        raise ValueError(f"delimiter must be one character other than a quote or a line break, got {delimiter!r}")
    kind = _kind(path)
    available = column_names(path, delimiter=delimiter)
    if len(set(available)) != len(available):
        dup = next(n for n in available if available.count(n) > 1)
        raise DataError(f"{path}: the column name {dup!r} appears twice")
    names = list(available if names is None else names)
    missing = [n for n in names if n not in available]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {_listing(available)})"
                        + (_delimiter_hint(available, delimiter) if kind == "csv" else ""))
    if not names:
        raise DataError(f"{path}: no columns selected")
    if kind == "csv":
        use_arrow = engine == "pyarrow" or (engine == "auto" and os.path.getsize(path) > ARROW_MIN_BYTES
                                            and _has_pyarrow())
        if use_arrow and not _has_pyarrow():
            raise DataError(f"the pyarrow CSV engine needs pyarrow: {ARROW_HINT}")
        with _utf8(path):
            skip = _csv_head(path, delimiter)[1]
            values = (_csv_arrow if use_arrow else _csv_numpy)(path, names, available, delimiter, skip)
    elif kind == "npy":
        values = _npy_columns(path, _load_npy(path), names)
    elif kind == "npz":
        columns = _npz_columns(path)
        values = np.stack([np.asarray(columns[n], dtype=np.float64) for n in names], axis=1)
    else:
        values = _parquet_columns(path, names)
    if values.shape[0] == 0:
        raise DataError(f"{path}: no data rows")
    _check_finite(path, names, values)
    return values


# ---------------------------------------------------------------- CSV

def _csv_header(path, delimiter: str = ",") -> list[str]:
    return _csv_head(path, delimiter)[0]


def _csv_head(path, delimiter: str = ",") -> tuple[list[str], int]:
    """The header's names and the lines it spans: a quoted name may hold a line break (a
    spreadsheet's "Yield⏎(t/ha)"), and both parsers skip lines, not rows."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
    if not header or header == [""]:
        raise DataError(f"{path}: empty file (a CSV needs a header row of column names)")
    return [h.strip() for h in header], reader.line_num


def other_delimiter(header: Sequence[str], delimiter: str) -> str | None:
    """The delimiter a CSV header read with ``delimiter`` was probably separated by: a header
    read as one column that holds ";", a tab, "|" or ",". None when it does not look so."""
    if len(header) == 1:
        for other in (";", "\t", "|", ","):
            if other != delimiter and other in header[0]:
                return other
    return None


def _delimiter_hint(available: list[str], delimiter: str) -> str:
    other = other_delimiter(available, delimiter)
    return "" if other is None else f"; the header looks {other!r}-separated: read it with delimiter={other!r}"


def _csv_arrow(path, names, available, delimiter, skip=1) -> np.ndarray:
    import pyarrow as pa
    from pyarrow import csv as pacsv

    def read(newlines_in_values: bool):
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=available, skip_rows=skip),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=newlines_in_values),
            convert_options=pacsv.ConvertOptions(include_columns=names,
                                                 column_types={n: pa.float64() for n in names}),
        )

    try:
        try:
            table = read(False)
        except pa.ArrowInvalid:
            # A quoted cell that spans lines (a note with a line break) puts pyarrow's block
            # splitter out of sync on files over one block; reading such cells costs speed on
            # every file, so only a failed read pays for it.
            table = read(True)
    except pa.ArrowInvalid as err:
        _raise_first_bad_cell(path, names, available, delimiter, fallback=str(err))
    # Nulls (empty cells, "NA", "nan") become NaN; _check_finite reports the first one.
    return np.column_stack([table.column(n).to_numpy(zero_copy_only=False) for n in names])


def _csv_numpy(path, names, available, delimiter, skip=1) -> np.ndarray:
    # Every column is read so that a row with too many or too few fields is an error (loadtxt's
    # usecols would skip that check); a column that is not used is read as one byte.
    used = set(names)
    dtype = np.dtype([(f"f{i}", "f8" if n in used else "S1") for i, n in enumerate(available)])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "loadtxt: input contained no data")  # read_columns says so
            # comments=None: "#" is data in a CSV (loadtxt's default would drop or cut rows at it)
            table = np.loadtxt(path, delimiter=delimiter, skiprows=skip, quotechar='"', ndmin=1, dtype=dtype,
                               encoding="utf-8-sig", comments=None)
    except ValueError as err:
        _raise_first_bad_cell(path, names, available, delimiter, fallback=str(err))
    return np.column_stack([table[f"f{available.index(n)}"] for n in names]).reshape(len(table), len(names))


_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|nan|inf|infinity)\s*",
                     re.IGNORECASE | re.ASCII)  # ASCII digits: what both parsers read


def _raise_first_bad_cell(path, names, available, delimiter, fallback: str):
    """A parser refused the file: find the first offending cell with the csv
    module (this runs only on failure) and say where it is."""
    index = [available.index(n) for n in names]
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        next(reader)
        row_number = 0
        for row in reader:
            if not row:  # a blank line: both parsers skip it
                continue
            row_number += 1
            if len(row) != len(available):
                raise DataError(f"{path}: line {reader.line_num} has {len(row)} fields, "
                                f"the header has {len(available)}")
            for i, name in zip(index, names):
                cell = row[i]
                where = f"{path}: row {row_number} (line {reader.line_num}), column {name!r}"
                if cell.strip() == "":
                    raise DataError(f"{where}: a missing value (empty cell); every value used must be a finite number")
                if not _NUMBER.fullmatch(cell):
                    raise DataError(f"{where}: {cell!r} is not a number")
    raise DataError(f"{path}: {fallback}")


# ---------------------------------------------------------------- .npy / .npz

def _load_npy(path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None


def _npy_names(path, array: np.ndarray) -> list[str]:
    if array.dtype.names:
        shaped = next((n for n in array.dtype.names if array.dtype[n].shape), None)
        if shaped is not None:  # several values per row under one name: which column is which?
            raise DataError(f"{path}: a .npy field must hold one value per row; {shaped!r} holds "
                            f"{array.dtype[shaped].shape}")
        return list(array.dtype.names)
    if array.ndim == 1:
        return ["0"]
    if array.ndim == 2:
        return [str(i) for i in range(array.shape[1])]
    raise DataError(f"{path}: a .npy data set must be 1-D or 2-D (rows, columns), got shape {array.shape}")


def _npy_columns(path, array: np.ndarray, names) -> np.ndarray:
    if array.dtype.names:
        columns = [array[n] for n in names]
    else:
        if not _real(array.dtype):
            raise DataError(f"{path}: holds {array.dtype}, not real numbers")
        array = array.reshape(-1, 1) if array.ndim == 1 else array
        columns = [array[:, int(n)] for n in names]
    for n, c in zip(names, columns):
        if not _real(c.dtype):
            raise DataError(f"{path}: column {n!r} holds {c.dtype}, not real numbers")
    return np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=1)


def _npz_columns(path) -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {}
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None
    with archive:
        for key in archive.files:
            a = archive[key]
            if not _real(a.dtype):
                raise DataError(f"{path}: array {key!r} holds {a.dtype}, not real numbers")
            if a.ndim == 1:
                named = {key: a}
            elif a.ndim == 2:
                named = {f"{key}[{i}]": a[:, i] for i in range(a.shape[1])}
            else:
                raise DataError(f"{path}: array {key!r} must be 1-D or 2-D (rows, columns), got shape {a.shape}")
            clash = next((name for name in named if name in columns), None)
            if clash is not None:  # an array "X[0]" beside a 2-D "X": one would replace the other
                raise DataError(f"{path}: two columns named {clash!r} (an array of that name and a column "
                                f"of a 2-D array)")
            columns.update(named)
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{path}: the arrays differ in length ({_listing(f'{k}: {n}' for k, n in lengths.items())})")
    if not columns:
        raise DataError(f"{path}: the archive holds no arrays")
    return columns


# ---------------------------------------------------------------- Parquet

def _parquet_schema(path):
    if not _has_pyarrow():
        raise DataError(f"reading Parquet needs pyarrow: {ARROW_HINT}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a Parquet file ({' '.join(str(err).split())})") from None


def _parquet_columns(path, names) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=list(names))
    out = []
    for n in names:
        column = table.column(n)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
                or pa.types.is_boolean(column.type)):
            raise DataError(f"{path}: column {n!r} holds {column.type}, not numbers")
        out.append(column.cast(pa.float64()).to_numpy(zero_copy_only=False))  # nulls -> NaN
    return np.column_stack(out)


# ---------------------------------------------------------------- shared

def _kind(path) -> str:
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder, not a data file")
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown file type {suffix or '(none)'!r}; "
                        f"give a .csv, .npy, .npz or .parquet file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    return {".pq": "parquet"}.get(suffix, suffix[1:])


@contextlib.contextmanager
def _utf8(path):
    """A CSV that is not UTF-8 (Latin-1 from a spreadsheet): one DataError, not a decoder's traceback."""
    try:
        yield
    except UnicodeDecodeError as err:
        byte = err.object[err.start : err.start + 1].hex()
        raise DataError(f"{path}: not UTF-8 text (the byte 0x{byte}); save it as UTF-8 "
                        f"(e.g. a spreadsheet's \"CSV UTF-8\")") from None


def _real(dtype: np.dtype) -> bool:
    """Real numbers or booleans: a complex column would lose its imaginary part to float64."""
    return (np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating)) or dtype == np.bool_


def _has_pyarrow() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def _check_finite(path, names, values: np.ndarray) -> None:
    finite = np.isfinite(values)
    if finite.all():
        return
    row, col = np.argwhere(~finite)[0]  # the first in row order
    value = values[row, col]
    what = "a missing value (empty, NA or NaN)" if np.isnan(value) else f"{value}"
    raise DataError(f"{path}: row {row + 1}, column {names[col]!r}: {what}; every value used must be a finite number")


def _listing(items, limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", … ({len(items)} in all)" if len(items) > limit else "")
