from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_INT64: DType

class TensorSpec(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_name", "model_revision", "architecture", "model_type", "hidden_size", "vocab_size", "dtype", "tokenizer_name", "tokenizer_size", "tokenizer_fingerprint", "server_version", "max_batch_tokens", "max_request_bytes", "backend", "instance_id", "image_options", "max_encode_samples", "max_text_bytes", "max_turns", "max_score_items", "max_score_paths")
    class ImageOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_ENCODE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TURNS_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_PATHS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_revision: str
    architecture: str
    model_type: str
    hidden_size: int
    vocab_size: int
    dtype: DType
    tokenizer_name: str
    tokenizer_size: int
    tokenizer_fingerprint: str
    server_version: str
    max_batch_tokens: int
    max_request_bytes: int
    backend: str
    instance_id: str
    image_options: _containers.ScalarMap[str, str]
    max_encode_samples: int
    max_text_bytes: int
    max_turns: int
    max_score_items: int
    max_score_paths: int
    def __init__(self, model_name: _Optional[str] = ..., model_revision: _Optional[str] = ..., architecture: _Optional[str] = ..., model_type: _Optional[str] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., tokenizer_name: _Optional[str] = ..., tokenizer_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., server_version: _Optional[str] = ..., max_batch_tokens: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., instance_id: _Optional[str] = ..., image_options: _Optional[_Mapping[str, str]] = ..., max_encode_samples: _Optional[int] = ..., max_text_bytes: _Optional[int] = ..., max_turns: _Optional[int] = ..., max_score_items: _Optional[int] = ..., max_score_paths: _Optional[int] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("role", "text")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    role: str
    text: str
    def __init__(self, role: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("sample_id", "turns", "images")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, sample_id: _Optional[str] = ..., turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("samples", "return_question_features", "feature_dtype", "max_length")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RETURN_QUESTION_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    return_question_features: bool
    feature_dtype: DType
    max_length: int
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., return_question_features: _Optional[bool] = ..., feature_dtype: _Optional[_Union[DType, str]] = ..., max_length: _Optional[int] = ...) -> None: ...

class EncodedSample(_message.Message):
    __slots__ = ("sample_id", "handle", "answer_token_ids", "answer_lengths", "question_lengths", "answer_features", "question_features", "teacher_ce")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FEATURES_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FEATURES_FIELD_NUMBER: _ClassVar[int]
    TEACHER_CE_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    handle: str
    answer_token_ids: _containers.RepeatedScalarFieldContainer[int]
    answer_lengths: _containers.RepeatedScalarFieldContainer[int]
    question_lengths: _containers.RepeatedScalarFieldContainer[int]
    answer_features: int
    question_features: int
    teacher_ce: float
    def __init__(self, sample_id: _Optional[str] = ..., handle: _Optional[str] = ..., answer_token_ids: _Optional[_Iterable[int]] = ..., answer_lengths: _Optional[_Iterable[int]] = ..., question_lengths: _Optional[_Iterable[int]] = ..., answer_features: _Optional[int] = ..., question_features: _Optional[int] = ..., teacher_ce: _Optional[float] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("samples", "tensors")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[EncodedSample]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, samples: _Optional[_Iterable[_Union[EncodedSample, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class EncodeResponseFrame(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: EncodeResponse
    payload: bytes
    def __init__(self, header: _Optional[_Union[EncodeResponse, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ScoreItem(_message.Message):
    __slots__ = ("handle", "path", "outputs")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    handle: str
    path: str
    outputs: int
    def __init__(self, handle: _Optional[str] = ..., path: _Optional[str] = ..., outputs: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "tensors", "ce_weight", "kl_weight", "normalizer", "grad_dtype", "release")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    KL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NORMALIZER_FIELD_NUMBER: _ClassVar[int]
    GRAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    ce_weight: float
    kl_weight: float
    normalizer: float
    grad_dtype: DType
    release: bool
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., ce_weight: _Optional[float] = ..., kl_weight: _Optional[float] = ..., normalizer: _Optional[float] = ..., grad_dtype: _Optional[_Union[DType, str]] = ..., release: _Optional[bool] = ...) -> None: ...

class PathScore(_message.Message):
    __slots__ = ("path", "ce", "kl", "num_tokens")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CE_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    path: str
    ce: float
    kl: float
    num_tokens: int
    def __init__(self, path: _Optional[str] = ..., ce: _Optional[float] = ..., kl: _Optional[float] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("paths", "gradients", "tensors")
    PATHS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedCompositeFieldContainer[PathScore]
    gradients: _containers.RepeatedScalarFieldContainer[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, paths: _Optional[_Iterable[_Union[PathScore, _Mapping]]] = ..., gradients: _Optional[_Iterable[int]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class ScoreRequestFrame(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: ScoreRequest
    payload: bytes
    def __init__(self, header: _Optional[_Union[ScoreRequest, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ScoreResponseFrame(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: ScoreResponse
    payload: bytes
    def __init__(self, header: _Optional[_Union[ScoreResponse, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("handles",)
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, handles: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...
