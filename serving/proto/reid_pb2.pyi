from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PixelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_FORMAT_UNSPECIFIED: _ClassVar[PixelFormat]
    RGB8: _ClassVar[PixelFormat]
    BGR8: _ClassVar[PixelFormat]

class IndexType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_TYPE_UNSPECIFIED: _ClassVar[IndexType]
    FLAT: _ClassVar[IndexType]
    HNSW: _ClassVar[IndexType]
PIXEL_FORMAT_UNSPECIFIED: PixelFormat
RGB8: PixelFormat
BGR8: PixelFormat
INDEX_TYPE_UNSPECIFIED: IndexType
FLAT: IndexType
HNSW: IndexType

class RawImage(_message.Message):
    __slots__ = ("pixels", "height", "width", "format")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    height: int
    width: int
    format: PixelFormat
    def __init__(self, pixels: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., format: _Optional[_Union[PixelFormat, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class BoundingBox(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("image", "boxes")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    image: Image
    boxes: _containers.RepeatedCompositeFieldContainer[BoundingBox]
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., boxes: _Optional[_Iterable[_Union[BoundingBox, _Mapping]]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images", "frame", "request_id")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    frame: Frame
    request_id: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResult(_message.Message):
    __slots__ = ("embedding", "error")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    embedding: Embedding
    error: Error
    def __init__(self, embedding: _Optional[_Union[Embedding, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("results", "dimension", "normalized", "request_id", "model", "model_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EmbedResult]
    dimension: int
    normalized: bool
    request_id: str
    model: str
    model_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[EmbedResult, _Mapping]]] = ..., dimension: _Optional[int] = ..., normalized: _Optional[bool] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class EntryMetadata(_message.Message):
    __slots__ = ("person_id", "camera_id", "timestamp", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PERSON_ID_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    person_id: str
    camera_id: str
    timestamp: float
    labels: _containers.ScalarMap[str, str]
    def __init__(self, person_id: _Optional[str] = ..., camera_id: _Optional[str] = ..., timestamp: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateGalleryRequest(_message.Message):
    __slots__ = ("name", "dimension", "index_type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimension: int
    index_type: IndexType
    def __init__(self, name: _Optional[str] = ..., dimension: _Optional[int] = ..., index_type: _Optional[_Union[IndexType, str]] = ...) -> None: ...

class GalleryInfo(_message.Message):
    __slots__ = ("name", "dimension", "size", "index_type", "backend", "device", "model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimension: int
    size: int
    index_type: IndexType
    backend: str
    device: str
    model: str
    def __init__(self, name: _Optional[str] = ..., dimension: _Optional[int] = ..., size: _Optional[int] = ..., index_type: _Optional[_Union[IndexType, str]] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class DropGalleryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropGalleryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGalleriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGalleriesResponse(_message.Message):
    __slots__ = ("galleries",)
    GALLERIES_FIELD_NUMBER: _ClassVar[int]
    galleries: _containers.RepeatedCompositeFieldContainer[GalleryInfo]
    def __init__(self, galleries: _Optional[_Iterable[_Union[GalleryInfo, _Mapping]]] = ...) -> None: ...

class GetGalleryInfoRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AddToGalleryRequest(_message.Message):
    __slots__ = ("gallery", "images", "embeddings", "metadata", "ids", "replace_existing")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_EXISTING_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    metadata: _containers.RepeatedCompositeFieldContainer[EntryMetadata]
    ids: _containers.RepeatedScalarFieldContainer[int]
    replace_existing: bool
    def __init__(self, gallery: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., metadata: _Optional[_Iterable[_Union[EntryMetadata, _Mapping]]] = ..., ids: _Optional[_Iterable[int]] = ..., replace_existing: _Optional[bool] = ...) -> None: ...

class AddToGalleryResponse(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RemoveFromGalleryRequest(_message.Message):
    __slots__ = ("gallery", "ids", "person_ids", "before_timestamp")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PERSON_IDS_FIELD_NUMBER: _ClassVar[int]
    BEFORE_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    person_ids: _containers.RepeatedScalarFieldContainer[str]
    before_timestamp: float
    def __init__(self, gallery: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ..., person_ids: _Optional[_Iterable[str]] = ..., before_timestamp: _Optional[float] = ...) -> None: ...

class RemoveFromGalleryResponse(_message.Message):
    __slots__ = ("removed", "missing", "missing_person_ids")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    MISSING_PERSON_IDS_FIELD_NUMBER: _ClassVar[int]
    removed: int
    missing: _containers.RepeatedScalarFieldContainer[int]
    missing_person_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, removed: _Optional[int] = ..., missing: _Optional[_Iterable[int]] = ..., missing_person_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ("gallery", "person_ids", "after_id", "page_size", "include_embeddings", "filter")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    PERSON_IDS_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    person_ids: _containers.RepeatedScalarFieldContainer[str]
    after_id: int
    page_size: int
    include_embeddings: bool
    filter: SearchFilter
    def __init__(self, gallery: _Optional[str] = ..., person_ids: _Optional[_Iterable[str]] = ..., after_id: _Optional[int] = ..., page_size: _Optional[int] = ..., include_embeddings: _Optional[bool] = ..., filter: _Optional[_Union[SearchFilter, _Mapping]] = ...) -> None: ...

class GalleryEntry(_message.Message):
    __slots__ = ("id", "metadata", "embedding")
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    id: int
    metadata: EntryMetadata
    embedding: Embedding
    def __init__(self, id: _Optional[int] = ..., metadata: _Optional[_Union[EntryMetadata, _Mapping]] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_after_id")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[GalleryEntry]
    next_after_id: int
    def __init__(self, entries: _Optional[_Iterable[_Union[GalleryEntry, _Mapping]]] = ..., next_after_id: _Optional[int] = ...) -> None: ...

class SearchFilter(_message.Message):
    __slots__ = ("exclude_camera_id", "time_from", "time_to", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EXCLUDE_CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FROM_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    exclude_camera_id: str
    time_from: float
    time_to: float
    labels: _containers.ScalarMap[str, str]
    def __init__(self, exclude_camera_id: _Optional[str] = ..., time_from: _Optional[float] = ..., time_to: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RerankOptions(_message.Message):
    __slots__ = ("enabled", "k1", "k2", "lambda_value", "pool", "joint")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    K1_FIELD_NUMBER: _ClassVar[int]
    K2_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_VALUE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    JOINT_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    k1: int
    k2: int
    lambda_value: float
    pool: int
    joint: bool
    def __init__(self, enabled: _Optional[bool] = ..., k1: _Optional[int] = ..., k2: _Optional[int] = ..., lambda_value: _Optional[float] = ..., pool: _Optional[int] = ..., joint: _Optional[bool] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("gallery", "images", "embeddings", "entry_ids", "top_k", "filters", "rerank", "group_by_person")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_PERSON_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    entry_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    filters: _containers.RepeatedCompositeFieldContainer[SearchFilter]
    rerank: RerankOptions
    group_by_person: bool
    def __init__(self, gallery: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., entry_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., filters: _Optional[_Iterable[_Union[SearchFilter, _Mapping]]] = ..., rerank: _Optional[_Union[RerankOptions, _Mapping]] = ..., group_by_person: _Optional[bool] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "distance", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    score: float
    distance: float
    metadata: EntryMetadata
    def __init__(self, id: _Optional[int] = ..., score: _Optional[float] = ..., distance: _Optional[float] = ..., metadata: _Optional[_Union[EntryMetadata, _Mapping]] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("hits", "error")
    HITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    error: Error
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ...) -> None: ...
