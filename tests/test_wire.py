"""serving.wire.embedding_message against protobuf's own conversion of the same values."""
import numpy as np
import pytest

from serving.proto import reid_pb2
from serving.wire import embedding_message


def _reference(values) -> reid_pb2.Embedding:
    return reid_pb2.Embedding(values=np.asarray(values, dtype=np.float32).tolist())


@pytest.mark.parametrize("dim", [1, 31, 32, 512, 40_000])  # 128 and 160,000 bytes need 2- and 3-byte lengths
def test_same_message_as_protobuf_builds(dim):
    values = np.random.default_rng(dim).standard_normal(dim).astype(np.float32)
    message = embedding_message(values)
    assert message.SerializeToString() == _reference(values).SerializeToString()
    assert np.array_equal(np.asarray(message.values, dtype=np.float32), values)


def test_special_values_keep_their_bits():
    values = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, np.finfo(np.float32).max], dtype=np.float32)
    back = np.asarray(embedding_message(values).values, dtype=np.float32)
    assert back.view(np.uint32).tolist() == values.view(np.uint32).tolist()


@pytest.mark.parametrize("values", [[0.5, -2.0, 3.25], np.array([0.1, 0.2, 0.3]), np.array([1.5, 2.5], dtype=">f4")],
                         ids=["list", "float64", "big-endian"])
def test_other_inputs_become_float32(values):
    assert embedding_message(values) == _reference(values)


def test_empty_vector_is_an_empty_message():
    message = embedding_message(np.zeros(0, np.float32))
    assert len(message.values) == 0 and message.SerializeToString() == b""


def test_a_matrix_is_refused():
    with pytest.raises(ValueError, match="one vector"):
        embedding_message(np.zeros((2, 4), np.float32))
