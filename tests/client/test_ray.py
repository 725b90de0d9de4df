"""cosserve.ray on a local Ray cluster this test starts (four logical CPUs: two actors, a reader and a writer), against two real server
processes holding the same shared corpus (a Parquet file with int64 ids): the pipeline's rows
equal the single-client job's, ids included."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import cosserve.ray  # noqa: E402
from cosserve import cli  # noqa: E402
from tests.client.test_jobs import read_parts, write_parquet  # noqa: E402
from tests.conftest import start_process, stop_process  # noqa: E402

pytestmark = pytest.mark.slow


def test_ray_pipeline_equals_the_single_client_job(tmp_path):
    rng = np.random.default_rng(30)
    corpus = rng.standard_normal((1200, 16)).astype(np.float32)
    corpus_ids = rng.permutation(10**6)[:1200].astype(np.int64)  # the server keeps them: rows come back with them
    write_parquet(tmp_path / "corpus.parquet", corpus, corpus_ids, row_group_size=500)
    queries = rng.standard_normal((900, 16)).astype(np.float32)
    (tmp_path / "queries").mkdir()
    ids = np.array([f"q-{i}" for i in range(900)], dtype=object)
    for i in range(0, 900, 300):
        write_parquet(tmp_path / "queries" / f"{i:04d}.parquet", queries[i : i + 300], ids[i : i + 300], row_group_size=100)
    replicas = [start_process("--corpus", f"docs={tmp_path / 'corpus.parquet'}") for _ in range(2)]
    servers = [address for _, address in replicas]
    try:
        single = {}
        for job, flags in (("topk", ["--k", "5"]), ("threshold", ["--min-score", "0.6"])):
            out = tmp_path / f"{job}.parquet"
            argv = ["score", job, "--corpus", "@docs", "--queries", str(tmp_path / "queries"), "--server", servers[0],
                    "--device", "cpu", "--no-progress", "--out", str(out), *flags]
            assert cli.main(argv) == 0
            single[job] = read_parts(out)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            options = {"servers": servers, "corpus": "@docs", "device": "cpu", "batch_size": 64}
            mappers = {
                "topk": (cosserve.ray.TopK, {**options, "k": 5}, ["query_id", "rank"]),
                "threshold": (cosserve.ray.Threshold, {**options, "min_score": 0.6}, None),
            }
            for job, (mapper, kwargs, order) in mappers.items():
                ds = ray.data.read_parquet(str(tmp_path / "queries"), override_num_blocks=3)
                out = ds.map_batches(mapper, fn_constructor_kwargs=kwargs, batch_format="pyarrow", batch_size=128, concurrency=2, num_cpus=1)
                folder = tmp_path / f"ray-{job}"
                out.write_parquet(str(folder))
                got = pq.read_table(folder)
                want = single[job].replace_schema_metadata(None)
                keys = [("query_id", "ascending"), ("rank", "ascending")] if order else None
                if keys is None:  # threshold: each query's rows in order; queries in any order
                    keys = [("query_id", "ascending")]
                    got = got.append_column("at", pa.array(np.arange(got.num_rows)))
                    want = want.append_column("at", pa.array(np.arange(want.num_rows)))
                    keys.append(("at", "ascending"))
                    got, want = got.sort_by(keys).drop_columns(["at"]), want.sort_by(keys).drop_columns(["at"])
                else:
                    got, want = got.sort_by(keys), want.sort_by(keys)
                assert got.num_rows == want.num_rows > 0, job
                assert got.select(want.column_names).equals(want), job
                assert set(got.column("corpus_id").to_pylist()) <= set(corpus_ids.tolist()), job
        finally:
            ray.shutdown()
    finally:
        for proc, _ in replicas:
            stop_process(proc)
