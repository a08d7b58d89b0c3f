"""linreg_fused.io: CSV (both parsers), .npy/.npz and Parquet into float64 columns, and
one-line errors that name the file, the row and the column."""

import importlib.util
import re

import numpy as np
import pytest

from linreg_fused import io
from linreg_fused.io import DataError, column_names, read_columns

HAS_ARROW = importlib.util.find_spec("pyarrow") is not None
ENGINES = ["numpy", pytest.param("pyarrow", marks=pytest.mark.skipif(not HAS_ARROW, reason="needs pyarrow"))]


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    return request.param


def write(tmp_path, text: str, name: str = "data.csv", newline: str = "\n"):
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode())
    return path


def test_csv_values_are_correctly_rounded(tmp_path, engine):
    # Shortest-repr float64 (up to 17 significant digits), numpy.savetxt's default 19-digit
    # %.18e, tiny and huge exponents: each cell must read back as Python's float() of its text.
    rng = np.random.default_rng()
    values = rng.standard_normal((257, 3)) * np.array([1e-300, 1.0, 1e300]) * rng.uniform(0.5, 2, (257, 3))
    cells = [[repr(float(values[i, 0])), f"{values[i, 1]:.18e}", f"{values[i, 2]:.17g}"] for i in range(257)]
    cells.append(["-0", "+7", "1E3"])
    cells.append([".5", "5.", "-12345678901234567890"])
    path = write(tmp_path, "a,b,c\n" + "".join(",".join(r) + "\n" for r in cells))
    got = read_columns(path, engine=engine)
    expected = np.array([[float(c) for c in row] for row in cells])
    assert got.dtype == np.float64 and got.shape == (259, 3)
    np.testing.assert_array_equal(got, expected)


def test_csv_selects_and_orders_columns_and_ignores_unused_text(tmp_path, engine):
    path = write(tmp_path, 'region,"temp",rainfall,apples\n"Paris, FR",73,67,56\nOslo,91,88,81\n')
    assert column_names(path) == ["region", "temp", "rainfall", "apples"]
    got = read_columns(path, ["apples", "temp"], engine=engine)
    np.testing.assert_array_equal(got, [[56, 73], [81, 91]])


def test_csv_hash_is_data_not_a_comment(tmp_path, engine):
    # "#" starts no comment in a CSV: a row whose first cell starts with it, or a text cell
    # holding it, is data (numpy's parser dropped the first row and refused the second).
    path = write(tmp_path, 'id,note,a,y\n#1,x,1,3\nx2,item #2,2,4\n"#3",ok,3,7\n')
    np.testing.assert_array_equal(read_columns(path, ["a", "y"], engine=engine), [[1, 3], [2, 4], [3, 7]])
    np.testing.assert_array_equal(read_columns(write(tmp_path, "#a,b\n1,2\n", "h.csv"), engine=engine), [[1, 2]])
    assert column_names(path) == ["id", "note", "a", "y"]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_csv_line_endings_bom_blank_lines_and_quoted_numbers(tmp_path, engine, newline):
    path = tmp_path / "d.csv"
    path.write_bytes(("\ufeffx,y\n1.5,\"2\"\n\n-3,4e-1\n".replace("\n", newline)).encode())
    assert column_names(path) == ["x", "y"]
    np.testing.assert_array_equal(read_columns(path, engine=engine), [[1.5, 2.0], [-3.0, 0.4]])


@pytest.mark.parametrize("cell, message", [
    ("abc", "row 2 (line 3), column 'b': 'abc' is not a number"),
    ("1,5", "line 3 has 4 fields, the header has 3"),
    ("1_000", "row 2 (line 3), column 'b': '1_000' is not a number"),
    ("١٢", "row 2 (line 3), column 'b': '١٢' is not a number"),  # digits to Python's float, not to the parsers
])
def test_csv_bad_cell_names_row_and_column(tmp_path, engine, cell, message):
    path = write(tmp_path, f"a,b,c\n1,2,3\n4,{cell},6\n")
    with pytest.raises(DataError) as err:
        read_columns(path, ["a", "b"], engine=engine)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize("cell", ["", "nan", "NaN", "inf", "-inf"])
def test_csv_missing_and_non_finite_values_are_errors(tmp_path, engine, cell):
    path = write(tmp_path, f"a,b\n1,2\n3,4\n5,{cell}\n")
    with pytest.raises(DataError, match=r"row 3\b.*column 'b'.*finite number"):
        read_columns(path, engine=engine)
    # the same cell in a column that is not used is no problem
    np.testing.assert_array_equal(read_columns(path, ["a"], engine=engine), [[1], [3], [5]])


def test_csv_structure_errors(tmp_path, engine):
    with pytest.raises(DataError, match="no column 'z' \\(columns: a, b\\)"):
        read_columns(write(tmp_path, "a,b\n1,2\n"), ["a", "z"], engine=engine)
    with pytest.raises(DataError, match="no data rows"):
        read_columns(write(tmp_path, "a,b\n", "header_only.csv"), engine=engine)
    with pytest.raises(DataError, match="empty file"):
        read_columns(write(tmp_path, "", "empty.csv"), engine=engine)
    with pytest.raises(DataError, match="the column name 'a' appears twice"):
        read_columns(write(tmp_path, "a,b,a\n1,2,3\n", "dup.csv"), engine=engine)


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_csv_other_delimiters_and_the_hint_when_it_is_not_given(tmp_path, engine, delimiter):
    path = write(tmp_path, f'a{delimiter}b{delimiter}"c"\n1.5{delimiter}"2"{delimiter}3\n-4{delimiter}5e1{delimiter}6\n')
    assert column_names(path, delimiter=delimiter) == ["a", "b", "c"]
    np.testing.assert_array_equal(read_columns(path, ["c", "a"], engine=engine, delimiter=delimiter),
                                  [[3, 1.5], [6, -4]])
    hint = f"the header looks {delimiter!r}-separated: read it with delimiter={delimiter!r}"
    with pytest.raises(DataError, match="no column 'a' .*" + re.escape(hint)):
        read_columns(path, ["a"], engine=engine)
    with pytest.raises(DataError, match=r"row 1 \(line 2\), column 'b': '2,5' is not a number"):  # a decimal comma
        read_columns(write(tmp_path, f"a{delimiter}b\n1{delimiter}2,5\n", "comma.csv"), engine=engine,
                     delimiter=delimiter)
    assert io.other_delimiter(["a", "b"], ",") is None and io.other_delimiter(["a;b"], ";") is None


def test_small_csv_files_skip_pyarrow_under_auto(tmp_path, monkeypatch):
    """engine="auto" parses files up to 1 MB with numpy (importing pyarrow costs more than it
    saves there) and larger ones with pyarrow when it is installed."""
    used = []
    monkeypatch.setattr(io, "_csv_arrow", lambda *a: used.append("pyarrow") or io._csv_numpy(*a))
    monkeypatch.setattr(io, "_has_pyarrow", lambda: True)
    small = write(tmp_path, "a,b\n" + "1.25,2\n" * 10)
    np.testing.assert_array_equal(read_columns(small), [[1.25, 2.0]] * 10)
    assert used == []
    rows = io.ARROW_MIN_BYTES // 7 + 1
    large = write(tmp_path, "a,b\n" + "1.25,2\n" * rows, "large.csv")
    assert read_columns(large).shape == (rows, 2) and used == ["pyarrow"]


def test_file_type_and_existence_errors(tmp_path):
    with pytest.raises(DataError, match="is a folder, not a data file"):
        read_columns(tmp_path)
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(DataError, match="folder.csv is a folder, not a data file"):
        column_names(tmp_path / "folder.csv")
    with pytest.raises(ValueError, match="delimiter must be one character"):
        read_columns(write(tmp_path, "a\n1\n", "d.csv"), delimiter=";;")
    with pytest.raises(DataError, match="unknown file type '.xlsx'"):
        read_columns(tmp_path / "d.xlsx")
    with pytest.raises(DataError, match="no such file"):
        read_columns(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="engine must be one of"):
        read_columns(write(tmp_path, "a\n1\n"), engine="fast")


def test_pyarrow_engine_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_has_pyarrow", lambda: False)
    path = write(tmp_path, "a\n1\n")
    with pytest.raises(DataError, match=r"needs pyarrow: pip install pyarrow \(the arrow extra\)"):
        read_columns(path, engine="pyarrow")
    np.testing.assert_array_equal(read_columns(path), [[1.0]])  # auto falls back to numpy
    with pytest.raises(DataError, match=r"reading Parquet needs pyarrow: pip install pyarrow \(the arrow extra\)"):
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        read_columns(tmp_path / "d.parquet")


def test_npy_plain_one_d_and_structured(tmp_path):
    x = np.random.default_rng().standard_normal((7, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert column_names(tmp_path / "x.npy") == ["0", "1", "2"]
    np.testing.assert_array_equal(read_columns(tmp_path / "x.npy", ["2", "0"]), x[:, [2, 0]].astype(np.float64))
    np.save(tmp_path / "v.npy", np.arange(4))
    np.testing.assert_array_equal(read_columns(tmp_path / "v.npy"), [[0], [1], [2], [3]])
    rec = np.zeros(3, dtype=[("temp", "f8"), ("n", "i4")])
    rec["temp"], rec["n"] = [1.5, 2.5, 3.5], [1, 2, 3]
    np.save(tmp_path / "r.npy", rec)
    assert column_names(tmp_path / "r.npy") == ["temp", "n"]
    np.testing.assert_array_equal(read_columns(tmp_path / "r.npy", ["n", "temp"]), [[1, 1.5], [2, 2.5], [3, 3.5]])
    np.save(tmp_path / "nan.npy", np.array([[1.0, 2.0], [np.nan, 3.0]]))
    with pytest.raises(DataError, match=r"row 2, column '0': a missing value"):
        read_columns(tmp_path / "nan.npy")
    np.save(tmp_path / "obj.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy"):  # never unpickled
        read_columns(tmp_path / "obj.npy")


def test_npz_columns_by_key_and_expanded_matrices(tmp_path):
    rng = np.random.default_rng()
    X, y = rng.standard_normal((5, 2)), rng.standard_normal(5)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    assert column_names(tmp_path / "d.npz") == ["X[0]", "X[1]", "y"]
    np.testing.assert_array_equal(read_columns(tmp_path / "d.npz", ["y", "X[1]"]), np.column_stack([y, X[:, 1]]))
    np.savez(tmp_path / "bad.npz", a=np.ones(3), b=np.ones(4))
    with pytest.raises(DataError, match=r"the arrays differ in length \(a: 3, b: 4\)"):
        read_columns(tmp_path / "bad.npz")


@pytest.mark.skipif(not HAS_ARROW, reason="needs pyarrow")
def test_parquet_numeric_columns_nulls_and_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng()
    a, b = rng.standard_normal(6), rng.integers(-5, 5, 6)
    pq.write_table(pa.table({"a": a, "b": b, "city": ["x"] * 6}), tmp_path / "d.parquet")
    assert column_names(tmp_path / "d.parquet") == ["a", "b", "city"]
    np.testing.assert_array_equal(read_columns(tmp_path / "d.parquet", ["b", "a"]), np.column_stack([b, a]))
    with pytest.raises(DataError, match="column 'city' holds string, not numbers"):
        read_columns(tmp_path / "d.parquet", ["a", "city"])
    pq.write_table(pa.table({"a": pa.array([1.0, None, 3.0])}), tmp_path / "null.pq")
    with pytest.raises(DataError, match=r"row 2, column 'a': a missing value"):
        read_columns(tmp_path / "null.pq")


def test_csv_not_utf8_is_a_data_error(tmp_path, engine):
    """A Latin-1 file (a spreadsheet's "CSV" on some systems): one DataError naming the file and
    the encoding, where a UnicodeDecodeError traceback came out of the header or the parser."""
    header_bad = tmp_path / "h.csv"
    header_bad.write_bytes(b"temp\xe9rature,y\n1,2\n")
    cell_bad = tmp_path / "c.csv"
    cell_bad.write_bytes(b"a,note,y\n1,ok,2\n" + b"2,caf\xe9,3\n" * 5000)  # past the header's first read
    for path in (header_bad, cell_bad):
        with pytest.raises(DataError, match=r"not UTF-8 text \(the byte 0xe9\)"):
            read_columns(path, ["y"], engine=engine)
    with pytest.raises(DataError, match="not UTF-8"):
        column_names(header_bad)


def test_csv_header_names_with_line_breaks(tmp_path, engine):
    """A spreadsheet's header cell with a line break ("Yield⏎(t/ha)", quoted) spans two lines: both
    parsers skipped one line and read the name's second half as data (an error that named no cell)."""
    rng = np.random.default_rng()
    values = rng.standard_normal((5, 3))
    rows = "".join(",".join(repr(float(v)) for v in row) + "\n" for row in values)
    for header in ('"Yield\n(t/ha)",b,c\n', 'a,b,"c\n1"\n', '"a\n1\n2",b,"c\r\nd"\n'):
        path = write(tmp_path, header + rows)
        names = column_names(path)
        assert len(names) == 3 and "\n" in names[0] + names[2], names
        np.testing.assert_array_equal(read_columns(path, [names[2], "b", names[0]], engine=engine),
                                      values[:, [2, 1, 0]])


@pytest.mark.skipif(not HAS_ARROW, reason="needs pyarrow")
def test_pyarrow_reads_text_cells_with_line_breaks_in_large_files(tmp_path):
    """A quoted note holding a line break: pyarrow splits files over one block (1 MB) at line
    breaks and refused such a file ("CSV parser got out of sync with chunker")."""
    rng = np.random.default_rng()
    n = 40_000
    values = rng.standard_normal((n, 2))
    path = tmp_path / "notes.csv"
    with open(path, "w") as f:
        f.write("a,note,y\n")
        f.writelines(f'{a!r},"first line\nsecond, of row {i}",{y!r}\n' for i, (a, y) in enumerate(values.tolist()))
    assert path.stat().st_size > 2 * io.ARROW_MIN_BYTES
    np.testing.assert_array_equal(read_columns(path, ["y", "a"], engine="pyarrow"), values[:, ::-1])


def test_arrays_that_are_not_real_columns_are_data_errors(tmp_path):
    """Each of these read as something else, or failed with a traceback: complex values lost their
    imaginary part (one ComplexWarning), an npz key "X[0]" beside a 2-D "X" replaced X's first
    column, a structured field of two values per row and a damaged Parquet file raised a bare
    ValueError / ArrowInvalid."""
    rng = np.random.default_rng()
    z = rng.standard_normal((4, 2)) + 1j * rng.standard_normal((4, 2))
    np.save(tmp_path / "c.npy", z)
    np.savez(tmp_path / "c.npz", a=z[:, 0], b=z[:, 1].real)
    x = rng.standard_normal((4, 2))
    np.savez(tmp_path / "k.npz", X=x, **{"X[0]": x[:, 1]})
    pair = np.zeros(4, dtype=[("a", "f8", (2,)), ("b", "f8")])
    np.save(tmp_path / "s.npy", pair)
    for name, message in (("c.npy", "c.npy: holds complex128, not real numbers"),
                          ("c.npz", "c.npz: array 'a' holds complex128, not real numbers"),
                          ("k.npz", "k.npz: two columns named 'X[0]'"),
                          ("s.npy", "s.npy: a .npy field must hold one value per row; 'a' holds (2,)")):
        with pytest.raises(DataError, match=re.escape(message)):
            read_columns(tmp_path / name)
    if HAS_ARROW:
        (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet")
        for read in (column_names, read_columns):
            with pytest.raises(DataError, match=r"bad.parquet: not a Parquet file \(.*magic bytes"):
                read(tmp_path / "bad.parquet")


def test_unreadable_files_are_data_errors(tmp_path, monkeypatch):
    """A file without read permission (or on a failing disk) raised PermissionError / OSError, a
    traceback from the command line; now one DataError naming the file and the reason."""
    path = write(tmp_path, "a,y\n1,2\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(io, "open", denied, raising=False)  # the module's own reads; root ignores chmod
    for read in (column_names, read_columns):
        with pytest.raises(DataError, match=re.escape(f"{path}: cannot be read (Permission denied)")):
            read(path)
