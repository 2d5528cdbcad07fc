"""Generated gRPC stubs for protos/reid/v1/reid.proto (scripts/gen_protos.py; do not edit)."""
from . import reid_pb2, reid_pb2_grpc

__all__ = ["reid_pb2", "reid_pb2_grpc"]
