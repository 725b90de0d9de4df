"""cosserve.ray: the topk and threshold jobs as a Ray Data pipeline, for query sets one client
machine cannot drive. `TopK` and `Threshold` are callable classes for `Dataset.map_batches`:
Ray starts them as actors, each holding a connection and a session to every replica, and sends
each Arrow batch of queries (an id column and a vector column) to the next replica in turn. The
corpus is the replicas' shared corpus `@NAME` (`cosserve serve --corpus NAME=FILE`); its ids
come back with the rows when it has them, else its row numbers are the ids. The rows they
return are those of `cosserve score`'s Parquet output, so `write_parquet` finishes the job:

    ds = ray.data.read_parquet("queries/")
    ds.map_batches(cosserve.ray.TopK, fn_constructor_kwargs={"servers": [...], "corpus": "@docs", "k": 10},
                   batch_format="pyarrow", batch_size=4096, concurrency=8).write_parquet("results/")

Needs the `[ray]` extra (Ray Data and pyarrow); this module imports neither itself, so it loads
without them."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from cosserve.client import Client, Session
from cosserve.datasets import DatasetError, arrow_ids, arrow_vectors
from cosserve.errors import CosserveRpcError, InvalidArgumentError

__all__ = ["Threshold", "TopK"]


class _Replicas:
    """One connection and session to each replica, used in turn; a replica that is down
    (UNAVAILABLE) passes the batch to the next one."""

    def __init__(self, servers: Sequence[str] | str, corpus: str, device: str, token: str | None) -> None:
        addresses = [a.strip() for a in (servers.split(",") if isinstance(servers, str) else servers) if a.strip()]
        if not addresses:
            raise InvalidArgumentError("servers: give the replicas' host:port addresses")
        if not corpus.startswith("@"):
            raise InvalidArgumentError(f"corpus {corpus!r}: give the replicas' shared corpus as '@NAME' (cosserve serve --corpus NAME=FILE)")
        self.clients = [Client(address, token=token) for address in addresses]
        self.sessions: list[Session] = []
        try:
            listed = {c.name: c for c in self.clients[0].corpora()}
            info = listed.get(corpus[1:])
            if info is None:
                raise InvalidArgumentError(f"the servers have no shared corpus {corpus!r}; they have {', '.join('@' + n for n in listed) or 'none'}")
            self.dtype, self.rows, self.dim, self.ids = np.dtype(info.dtype), int(info.shape[0]), int(info.shape[1]), bool(info.id_type)
            self.sessions = [client.session(device) for client in self.clients]
        except BaseException:
            self.close()
            raise
        self._turn = itertools.cycle(range(len(self.sessions)))

    def call(self, ask: Any) -> Any:
        """`ask(session)` on the next replica, or on the ones after it while they are unavailable."""
        first = next(self._turn)
        for attempt in range(len(self.sessions)):
            try:
                return ask(self.sessions[(first + attempt) % len(self.sessions)])
            except CosserveRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == len(self.sessions) - 1:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for session in self.sessions:
            session.close()
        for client in self.clients:
            client.close()


class _Mapper:
    def __init__(
        self,
        servers: Sequence[str] | str,
        corpus: str,
        *,
        vector_column: str = "embedding",
        id_column: str = "id",
        device: str = "auto",
        token: str | None = None,
        batch_size: int = 256,
    ) -> None:
        self.corpus, self.vector_column, self.id_column, self.batch_size = corpus, vector_column, id_column, batch_size
        self.replicas = _Replicas(servers, corpus, device, token)

    def _queries(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors in the corpus dtype) of an Arrow batch (a Table or RecordBatch)."""
        names = batch.schema.names
        for column in (self.id_column, self.vector_column):
            if column not in names:
                raise DatasetError(f"a batch of queries has no column {column!r}; its columns are {', '.join(names)}")
        where = "a batch of queries"
        ids = arrow_ids(batch.column(self.id_column), where, self.id_column)
        vectors = arrow_vectors(batch.column(self.vector_column), where, self.vector_column)
        if vectors.shape[1] != self.replicas.dim and len(vectors):
            raise DatasetError(f"queries have width {vectors.shape[1]} but {self.corpus} has width {self.replicas.dim}; widths must match")
        return ids, np.asarray(vectors, dtype=self.replicas.dtype)

    def close(self) -> None:
        """Close the sessions (an actor Ray ends without calling this leaves them to expire)."""
        self.replicas.close()


def _table(columns: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    return pa.table({name: pa.array(values, type=pa.string()) if values.dtype == object else pa.array(values) for name, values in columns.items()})


class TopK(_Mapper):
    """`Dataset.map_batches(TopK, fn_constructor_kwargs={"servers": ..., "corpus": "@NAME", "k": K})`:
    each query's k best corpus rows as rows (query_id, rank, corpus_id, score), best first, ties
    by the lower row, as `cosserve score topk` writes them."""

    def __init__(self, servers: Sequence[str] | str, corpus: str, k: int = 10, **options: Any) -> None:
        super().__init__(servers, corpus, **options)
        if not 1 <= k <= self.replicas.rows:
            self.close()
            raise InvalidArgumentError(f"k must be between 1 and the {self.replicas.rows} rows of {corpus}, got {k}")
        self.k = k

    def __call__(self, batch: Any) -> Any:
        query_ids, vectors = self._queries(batch)
        with_ids = self.replicas.ids
        answer = self.replicas.call(lambda s: s.top_k(vectors, self.corpus, self.k, batch_size=self.batch_size, ids=with_ids))
        scores, indices = answer[0], answer[1]
        found = answer[2] if with_ids else indices
        return _table({
            "query_id": np.repeat(query_ids, self.k),
            "rank": np.tile(np.arange(self.k, dtype=np.int32), len(query_ids)),
            "corpus_id": found.reshape(-1),
            "score": scores.reshape(-1),
        })  # fmt: skip


class Threshold(_Mapper):
    """`Dataset.map_batches(Threshold, fn_constructor_kwargs={"servers": ..., "corpus": "@NAME",
    "min_score": TAU})`: every (query, corpus row) pair with cosine >= min_score as rows
    (query_id, corpus_id, score), each query's best first; `max_per_query` keeps the best that
    many, as `cosserve score threshold` does."""

    def __init__(self, servers: Sequence[str] | str, corpus: str, min_score: float, max_per_query: int | None = None, **options: Any) -> None:
        super().__init__(servers, corpus, **options)
        self.min_score, self.max_per_query = min_score, max_per_query

    def __call__(self, batch: Any) -> Any:
        query_ids, vectors = self._queries(batch)
        result = self.replicas.call(
            lambda s: s.range_search(vectors, self.corpus, self.min_score, max_per_query=self.max_per_query, batch_size=self.batch_size)
        )
        found = result.ids if result.ids is not None else result.indices
        return _table({"query_id": np.repeat(query_ids, np.diff(result.lims)), "corpus_id": found, "score": result.scores})
