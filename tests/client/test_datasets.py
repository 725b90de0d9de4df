"""cosserve.datasets: every input layout read back as the array and ids that were written, in
bounded pieces, and each malformed input refused with one DatasetError naming what is wrong."""

from __future__ import annotations

import os

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from cosserve.datasets import DatasetError, open_source  # noqa: E402


def vectors_column(x: np.ndarray, fixed: bool = True) -> object:
    if fixed:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    return pa.array(list(x), type=pa.list_(pa.from_numpy_dtype(x.dtype)))


def read_all(source, start=0, stop=None, rows=37):
    batches = list(source.batches(start, stop, rows=rows))
    assert all(len(b.vectors) <= rows for b in batches)
    if not batches:
        return np.zeros((0, source.dim), source.dtype), np.zeros(0)
    assert [b.start for b in batches] == list(np.cumsum([start] + [len(b.vectors) for b in batches[:-1]]))
    return np.concatenate([b.vectors for b in batches]), np.concatenate([b.ids for b in batches])


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((500, 6)).astype(np.float32)


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed_size_list", "list"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_parquet_file_with_int_ids(tmp_path, x, fixed, dtype):
    ids = np.arange(500, dtype=np.int64) * 7 - 1000
    pq.write_table(pa.table({"id": ids, "emb": vectors_column(x.astype(dtype), fixed)}), tmp_path / "a.parquet", row_group_size=64)
    source = open_source(str(tmp_path / "a.parquet"))
    assert (source.rows, source.dim, source.dtype, source.id_kind) == (500, 6, np.dtype(dtype), "int64")
    vectors, got_ids = read_all(source, 50, 433)
    np.testing.assert_array_equal(vectors, x.astype(dtype)[50:433])
    np.testing.assert_array_equal(got_ids, ids[50:433])
    np.testing.assert_array_equal(source.ids(), ids)
    rows = np.random.default_rng(1).permutation(500)[:200]
    np.testing.assert_array_equal(source.take(rows), x.astype(dtype)[rows])


def test_folder_of_parquet_with_string_ids_in_sorted_order(tmp_path, x):
    folder = tmp_path / "parts"
    folder.mkdir()
    ids = np.array([f"doc-{i}" for i in range(500)], dtype=object)
    for name, lo, hi in [("b.parquet", 200, 350), ("a.parquet", 0, 200), ("c.parquet", 350, 500)]:
        pq.write_table(pa.table({"name": ids[lo:hi], "vec": vectors_column(x[lo:hi])}), folder / name, row_group_size=50)
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".c.parquet.tmp").write_bytes(b"half a file")
    source = open_source(str(folder))
    assert source.id_kind == "string" and source.rows == 500
    vectors, got_ids = read_all(source, 0, None, rows=64)
    np.testing.assert_array_equal(vectors, x)
    assert list(got_ids) == list(ids)
    np.testing.assert_array_equal(source.take(np.array([499, 0, 201, 199])), x[[499, 0, 201, 199]])


def test_without_an_id_column_the_row_number_is_the_id(tmp_path, x):
    pq.write_table(pa.table({"emb": vectors_column(x), "score": np.ones(500)}), tmp_path / "a.parquet")
    source = open_source(str(tmp_path / "a.parquet"))
    assert source.id_kind == "row"
    np.testing.assert_array_equal(read_all(source, 10, 20)[1], np.arange(10, 20))


def test_named_columns_choose_among_several(tmp_path, x):
    table = pa.table({"a": np.arange(500), "b": [str(i) for i in range(500)], "e1": vectors_column(x), "e2": vectors_column(-x)})
    pq.write_table(table, tmp_path / "t.parquet")
    path = str(tmp_path / "t.parquet")
    with pytest.raises(DatasetError, match=r"several vector columns \(e1, e2\); choose one with --vector-column"):
        open_source(path)
    with pytest.raises(DatasetError, match=r"several possible id columns \(a, b\); choose one with --id-column"):
        open_source(path, vector_column="e2")
    source = open_source(path, vector_column="e2", id_column="b")
    np.testing.assert_array_equal(read_all(source)[0], -x)
    assert open_source(path, vector_column="e1", id_column="").id_kind == "row"


def test_npy_shards_are_one_array_in_sorted_order(tmp_path, x):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, (lo, hi) in enumerate([(0, 100), (100, 101), (101, 500)]):
        np.save(folder / f"emb_{i:03d}.npy", x[lo:hi])
    source = open_source(str(folder))
    assert (source.rows, source.id_kind) == (500, "row")
    np.testing.assert_array_equal(read_all(source, 90, 480)[0], x[90:480])
    np.testing.assert_array_equal(source.take(np.array([100, 3, 499])), x[[100, 3, 499]])
    assert source.array() is None


def test_npy_and_safetensors_are_memory_mapped(tmp_path, x):
    from safetensors.numpy import save_file

    np.save(tmp_path / "x.npy", x)
    save_file({"a": x, "b": x[:3]}, str(tmp_path / "x.safetensors"))
    for path in (tmp_path / "x.npy", f"{tmp_path / 'x.safetensors'}:a"):
        source = open_source(str(path))
        assert isinstance(source.array(), np.memmap)
        np.testing.assert_array_equal(read_all(source)[0], x)
    with pytest.raises(DatasetError, match="holds 2 tensors"):
        open_source(str(tmp_path / "x.safetensors"))


def malformed(tmp_path, x):
    """(name, path, options, the message's telling part) of each malformed input."""
    out = []
    pq.write_table(pa.table({"id": np.arange(500), "emb": vectors_column(x)}), tmp_path / "ok.parquet")
    out.append(("wrong column", tmp_path / "ok.parquet", {"vector_column": "embedding"}, "has no column 'embedding'"))
    out.append(("id not int or string", tmp_path / "ok.parquet", {"id_column": "emb"}, "ids must be integers or strings"))
    ragged = pa.array([list(r) for r in x[:9]] + [list(x[9, :5])], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"emb": ragged}), tmp_path / "mixed.parquet")
    out.append(("mixed dims", tmp_path / "mixed.parquet", {}, "mixed dimensions"))
    (tmp_path / "dims").mkdir()
    pq.write_table(pa.table({"emb": vectors_column(x[:5])}), tmp_path / "dims" / "a.parquet")
    pq.write_table(pa.table({"emb": vectors_column(x[:5, :4])}), tmp_path / "dims" / "b.parquet")
    out.append(("mixed dims across files", tmp_path / "dims", {}, "mixed dimensions"))
    nulls = pa.array([list(r) for r in x[:5]] + [None], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"emb": nulls}), tmp_path / "nulls.parquet")
    out.append(("null vector", tmp_path / "nulls.parquet", {}, "nulls in vector column 'emb'"))
    inner = pa.array([[1.0, None, 3.0], [1.0, 2.0, 3.0]], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"emb": inner}), tmp_path / "inner.parquet")
    out.append(("null value", tmp_path / "inner.parquet", {}, "nulls in vector column 'emb'"))
    good = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "corrupt.parquet").write_bytes(good[: len(good) // 2] + b"\0" * 64 + good[-200:])
    out.append(("corrupt parquet", tmp_path / "corrupt.parquet", {}, "corrupt.parquet"))
    (tmp_path / "truncated.parquet").write_bytes(good[: len(good) // 2])
    out.append(("truncated parquet", tmp_path / "truncated.parquet", {}, "not a readable Parquet file"))
    (tmp_path / "shards").mkdir()
    np.save(tmp_path / "shards" / "0.npy", x)
    np.save(tmp_path / "shards" / "1.npy", x.astype(np.float64))
    out.append(("shard of another dtype", tmp_path / "shards", {}, "is float64 but"))
    pq.write_table(pa.table({"a": np.arange(3)}), tmp_path / "novec.parquet")
    out.append(("no vector column", tmp_path / "novec.parquet", {}, "has no vector column"))
    return out


def test_each_malformed_input_is_one_clear_error(tmp_path, x):
    for name, path, options, message in malformed(tmp_path, x):
        with pytest.raises(DatasetError) as caught:
            source = open_source(str(path), **options)
            for _ in source.batches():
                pass
        text = str(caught.value)
        assert message in text and "\n" not in text and len(text) < 400, (name, text)


def test_reading_is_bounded_by_the_batch_not_the_file(tmp_path):
    """A 64 MB Parquet file read in 4096-row batches: the process grows by far less than the file."""
    psutil = pytest.importorskip("psutil")
    rows, dim = 40_000, 400
    x = np.random.default_rng(2).standard_normal((rows, dim)).astype(np.float32)
    pq.write_table(pa.table({"emb": vectors_column(x)}), tmp_path / "big.parquet", row_group_size=rows)
    del x
    source = open_source(str(tmp_path / "big.parquet"))
    process = psutil.Process(os.getpid())
    before, peak, total = process.memory_info().rss, 0, 0.0
    for batch in source.batches():
        total += float(batch.vectors[:, 0].sum())
        peak = max(peak, process.memory_info().rss - before)
    assert peak < 40 << 20, f"grew by {peak >> 20} MiB reading a {rows * dim * 4 >> 20} MiB file"
