"""A local, dependency-free viewer for exported attribution graphs (see :mod:`.server`)."""

from pipeline.viewer.server import (
    ANNOTATIONS_SCHEMA_VERSION,
    MAX_ANNOTATION_BYTES,
    ViewerServer,
    make_server,
    normalize_annotations,
    serve,
)

__all__ = [
    "ANNOTATIONS_SCHEMA_VERSION",
    "MAX_ANNOTATION_BYTES",
    "ViewerServer",
    "make_server",
    "normalize_annotations",
    "serve",
]
