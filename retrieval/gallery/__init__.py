"""Galleries of embeddings with metadata: the backend interface and the durable FAISS store."""
from retrieval.gallery.base import (
    EntryMetadata, EntryPage, GalleryBackend, GalleryError, GalleryExists, GalleryInfo, GalleryNotFound, Hit, InvalidEntry,
    RerankOptions, SearchFilter, StorageError,
)
from retrieval.gallery.faiss_store import FaissGalleryStore

__all__ = [
    "EntryMetadata", "EntryPage", "FaissGalleryStore", "GalleryBackend", "GalleryError", "GalleryExists", "GalleryInfo",
    "GalleryNotFound", "Hit", "InvalidEntry", "RerankOptions", "SearchFilter", "StorageError",
]
