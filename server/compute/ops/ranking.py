"""Batch scoring operators (extensions): the cosine similarity matrix and exact cosine top-k."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cosserve.server.compute import similarity
from cosserve.server.compute.numerics import check_query_corpus
from cosserve.server.compute.registry import ArgSpec, ArgType, InputSpec, OpSchema, register

_INPUTS = (InputSpec("Q", doc="(N, D) queries"), InputSpec("C", doc="(M, D) corpus"))


def _check_matrix(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> None:
    check_query_corpus(inputs[0], inputs[1])


def _check_top_k(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> None:
    check_query_corpus(inputs[0], inputs[1], args["k"])


@register(
    OpSchema(
        name="CosineSimilarityMatrix",
        inputs=_INPUTS,
        outputs=("S",),
        doc="S[i, j] = cosine similarity of Q row i and C row j, each squared norm floored at 1e-12; "
        "S is (N, M). Computed in float32 for float16/bfloat16.",
        caffe2=False,
    ),
    check_shapes=_check_matrix,
    output_bytes=lambda inputs, args: inputs[0].shape[0] * inputs[1].shape[0] * inputs[0].element_size(),
)
def cosine_similarity_matrix(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # S[i, j] = q_i·c_j / sqrt(max(q_i·q_i, 1e-12) · max(c_j·c_j, 1e-12))
    queries, corpus = inputs
    return [similarity.similarity_matrix(queries, corpus)]


@register(
    OpSchema(
        name="CosineTopK",
        inputs=_INPUTS,
        outputs=("Scores", "Indices"),
        args=(ArgSpec("k", ArgType.INT, 10, "rows of C kept per query; 1 <= k <= M"),),
        doc="Exact cosine top-k of each Q row among C's rows: Scores (N, k) in the input dtype and "
        "int64 Indices (N, k), best first, ties broken by lower index; memory stays bounded "
        "whatever M is.",
        caffe2=False,
    ),
    check_shapes=_check_top_k,
    output_bytes=lambda inputs, args: inputs[0].shape[0] * args["k"] * (inputs[0].element_size() + 8),
)
def cosine_top_k(inputs: Sequence[torch.Tensor], args: Mapping[str, Any]) -> list[torch.Tensor]:
    # Scores[i], Indices[i] = the k largest S[i, j] (of CosineSimilarityMatrix) by (-S[i, j], j)
    queries, corpus = inputs
    return list(similarity.top_k(queries, corpus, args["k"]))
