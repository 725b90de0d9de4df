from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]

class ArgType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARG_TYPE_UNSPECIFIED: _ClassVar[ArgType]
    ARG_FLOAT: _ClassVar[ArgType]
    ARG_INT: _ClassVar[ArgType]
    ARG_BOOL: _ClassVar[ArgType]
    ARG_STRING: _ClassVar[ArgType]
DTYPE_UNSPECIFIED: DType
BOOL: DType
UINT8: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT32: DType
FLOAT64: DType
ARG_TYPE_UNSPECIFIED: ArgType
ARG_FLOAT: ArgType
ARG_INT: ArgType
ARG_BOOL: ArgType
ARG_STRING: ArgType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Argument(_message.Message):
    __slots__ = ("name", "f", "i", "b", "s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    F_FIELD_NUMBER: _ClassVar[int]
    I_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    S_FIELD_NUMBER: _ClassVar[int]
    name: str
    f: float
    i: int
    b: bool
    s: str
    def __init__(self, name: _Optional[str] = ..., f: _Optional[float] = ..., i: _Optional[int] = ..., b: bool = ..., s: _Optional[str] = ...) -> None: ...

class OperatorDef(_message.Message):
    __slots__ = ("type", "input", "output", "arg")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ARG_FIELD_NUMBER: _ClassVar[int]
    type: str
    input: _containers.RepeatedScalarFieldContainer[str]
    output: _containers.RepeatedScalarFieldContainer[str]
    arg: _containers.RepeatedCompositeFieldContainer[Argument]
    def __init__(self, type: _Optional[str] = ..., input: _Optional[_Iterable[str]] = ..., output: _Optional[_Iterable[str]] = ..., arg: _Optional[_Iterable[_Union[Argument, _Mapping]]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("device", "session_id")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    device: str
    session_id: str
    def __init__(self, device: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id", "device")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    device: str
    def __init__(self, session_id: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FeedBlobRequest(_message.Message):
    __slots__ = ("session_id", "name", "tensor")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    tensor: Tensor
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class FeedBlobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FeedBlobChunk(_message.Message):
    __slots__ = ("session_id", "name", "dtype", "shape", "data")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class FetchBlobRequest(_message.Message):
    __slots__ = ("session_id", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class FetchBlobResponse(_message.Message):
    __slots__ = ("tensor",)
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class FetchBlobChunk(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class FeedBlobShmRequest(_message.Message):
    __slots__ = ("session_id", "name", "dtype", "shape", "shm_name", "offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    shm_name: str
    offset: int
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., shm_name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FetchBlobShmRequest(_message.Message):
    __slots__ = ("session_id", "name", "shm_name", "offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    shm_name: str
    offset: int
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ..., shm_name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FetchBlobShmResponse(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class HasBlobRequest(_message.Message):
    __slots__ = ("session_id", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class HasBlobResponse(_message.Message):
    __slots__ = ("exists",)
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    def __init__(self, exists: bool = ...) -> None: ...

class ListBlobsRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListBlobsResponse(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveBlobRequest(_message.Message):
    __slots__ = ("session_id", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class RemoveBlobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetWorkspaceRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ResetWorkspaceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunOperatorRequest(_message.Message):
    __slots__ = ("session_id", "op", "caffe2_op")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    CAFFE2_OP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    op: OperatorDef
    caffe2_op: bytes
    def __init__(self, session_id: _Optional[str] = ..., op: _Optional[_Union[OperatorDef, _Mapping]] = ..., caffe2_op: _Optional[bytes] = ...) -> None: ...

class RunOperatorResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunNetRequest(_message.Message):
    __slots__ = ("session_id", "ops", "caffe2_net")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    CAFFE2_NET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ops: _containers.RepeatedCompositeFieldContainer[OperatorDef]
    caffe2_net: bytes
    def __init__(self, session_id: _Optional[str] = ..., ops: _Optional[_Iterable[_Union[OperatorDef, _Mapping]]] = ..., caffe2_net: _Optional[bytes] = ...) -> None: ...

class RunNetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("op", "inputs", "device")
    OP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    op: OperatorDef
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    device: str
    def __init__(self, op: _Optional[_Union[OperatorDef, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., device: _Optional[str] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class ListOperatorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ArgSchema(_message.Message):
    __slots__ = ("name", "type", "default", "doc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: ArgType
    default: Argument
    doc: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[ArgType, str]] = ..., default: _Optional[_Union[Argument, _Mapping]] = ..., doc: _Optional[str] = ...) -> None: ...

class InputSchema(_message.Message):
    __slots__ = ("name", "dtypes", "doc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    doc: str
    def __init__(self, name: _Optional[str] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., doc: _Optional[str] = ...) -> None: ...

class OpSchema(_message.Message):
    __slots__ = ("name", "inputs", "outputs", "args", "doc", "gradient", "caffe2")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    CAFFE2_FIELD_NUMBER: _ClassVar[int]
    name: str
    inputs: _containers.RepeatedCompositeFieldContainer[InputSchema]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    args: _containers.RepeatedCompositeFieldContainer[ArgSchema]
    doc: str
    gradient: str
    caffe2: bool
    def __init__(self, name: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[InputSchema, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ..., args: _Optional[_Iterable[_Union[ArgSchema, _Mapping]]] = ..., doc: _Optional[str] = ..., gradient: _Optional[str] = ..., caffe2: bool = ...) -> None: ...

class ListOperatorsResponse(_message.Message):
    __slots__ = ("operators",)
    OPERATORS_FIELD_NUMBER: _ClassVar[int]
    operators: _containers.RepeatedCompositeFieldContainer[OpSchema]
    def __init__(self, operators: _Optional[_Iterable[_Union[OpSchema, _Mapping]]] = ...) -> None: ...

class CheckGradientRequest(_message.Message):
    __slots__ = ("session_id", "op", "step_size", "output_index")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    op: OperatorDef
    step_size: float
    output_index: int
    def __init__(self, session_id: _Optional[str] = ..., op: _Optional[_Union[OperatorDef, _Mapping]] = ..., step_size: _Optional[float] = ..., output_index: _Optional[int] = ...) -> None: ...

class InputGradientError(_message.Message):
    __slots__ = ("input", "max_abs_error", "max_rel_error")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    input: str
    max_abs_error: float
    max_rel_error: float
    def __init__(self, input: _Optional[str] = ..., max_abs_error: _Optional[float] = ..., max_rel_error: _Optional[float] = ...) -> None: ...

class CheckGradientResponse(_message.Message):
    __slots__ = ("inputs", "max_abs_error")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[InputGradientError]
    max_abs_error: float
    def __init__(self, inputs: _Optional[_Iterable[_Union[InputGradientError, _Mapping]]] = ..., max_abs_error: _Optional[float] = ...) -> None: ...

class TopKRequest(_message.Message):
    __slots__ = ("session_id", "corpus", "k", "queries", "with_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    WITH_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    corpus: str
    k: int
    queries: Tensor
    with_ids: bool
    def __init__(self, session_id: _Optional[str] = ..., corpus: _Optional[str] = ..., k: _Optional[int] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., with_ids: bool = ...) -> None: ...

class TopKResponse(_message.Message):
    __slots__ = ("scores", "indices", "ids")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    scores: Tensor
    indices: Tensor
    ids: CorpusIds
    def __init__(self, scores: _Optional[_Union[Tensor, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[_Union[CorpusIds, _Mapping]] = ...) -> None: ...

class CorpusIds(_message.Message):
    __slots__ = ("int64_ids", "string_ids")
    INT64_IDS_FIELD_NUMBER: _ClassVar[int]
    STRING_IDS_FIELD_NUMBER: _ClassVar[int]
    int64_ids: Tensor
    string_ids: StringIds
    def __init__(self, int64_ids: _Optional[_Union[Tensor, _Mapping]] = ..., string_ids: _Optional[_Union[StringIds, _Mapping]] = ...) -> None: ...

class StringIds(_message.Message):
    __slots__ = ("offsets", "utf8")
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    UTF8_FIELD_NUMBER: _ClassVar[int]
    offsets: Tensor
    utf8: bytes
    def __init__(self, offsets: _Optional[_Union[Tensor, _Mapping]] = ..., utf8: _Optional[bytes] = ...) -> None: ...

class RangeRequest(_message.Message):
    __slots__ = ("session_id", "corpus", "min_score", "max_per_query", "queries", "with_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_QUERY_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    WITH_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    corpus: str
    min_score: float
    max_per_query: int
    queries: Tensor
    with_ids: bool
    def __init__(self, session_id: _Optional[str] = ..., corpus: _Optional[str] = ..., min_score: _Optional[float] = ..., max_per_query: _Optional[int] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., with_ids: bool = ...) -> None: ...

class RangeResponse(_message.Message):
    __slots__ = ("lims", "indices", "scores", "truncated", "ids")
    LIMS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    lims: Tensor
    indices: Tensor
    scores: Tensor
    truncated: Tensor
    ids: CorpusIds
    def __init__(self, lims: _Optional[_Union[Tensor, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., truncated: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[_Union[CorpusIds, _Mapping]] = ...) -> None: ...

class SaveWorkspaceRequest(_message.Message):
    __slots__ = ("session_id", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class SaveWorkspaceResponse(_message.Message):
    __slots__ = ("blobs", "bytes")
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    blobs: int
    bytes: int
    def __init__(self, blobs: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class LoadWorkspaceRequest(_message.Message):
    __slots__ = ("session_id", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class LoadWorkspaceResponse(_message.Message):
    __slots__ = ("blobs", "bytes")
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    blobs: int
    bytes: int
    def __init__(self, blobs: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class ListCorporaRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CorpusInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "bytes", "source", "id_type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ID_TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    bytes: int
    source: str
    id_type: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., bytes: _Optional[int] = ..., source: _Optional[str] = ..., id_type: _Optional[str] = ...) -> None: ...

class ListCorporaResponse(_message.Message):
    __slots__ = ("corpora",)
    CORPORA_FIELD_NUMBER: _ClassVar[int]
    corpora: _containers.RepeatedCompositeFieldContainer[CorpusInfo]
    def __init__(self, corpora: _Optional[_Iterable[_Union[CorpusInfo, _Mapping]]] = ...) -> None: ...

class PublishCorpusRequest(_message.Message):
    __slots__ = ("session_id", "blob", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    blob: str
    name: str
    def __init__(self, session_id: _Optional[str] = ..., blob: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class PublishCorpusResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
