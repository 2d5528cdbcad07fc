"""The server's Prometheus series: the ones alerts watch exist at 0 from the start."""
import grpc

from serving.metrics import ServerMetrics


def _sample(metrics: ServerMetrics, name: str, **labels):
    return metrics.registry.get_sample_value(name, labels)  # None: no such series


def test_alerted_series_start_at_zero():
    """rate()/increase() see no rise in a series whose first sample is already 1: an alert on "any
    INTERNAL (or UNKNOWN, or model_error)" missed the first one after each start."""
    m = ServerMetrics()
    for code in ("INTERNAL", "UNKNOWN", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"):
        assert _sample(m, "reid_errors_total", code=code) == 0.0
    assert _sample(m, "reid_errors_total", code="OK") is None  # not an error
    assert all(_sample(m, "reid_images_total", outcome=o) == 0.0 for o in ("ok", "invalid", "model_error"))
    assert _sample(m, "reid_credential_reloads_total", credential="tls", outcome="refused") is None  # nothing watched yet
    m.watch_reloads("tls")
    assert _sample(m, "reid_credential_reloads_total", credential="tls", outcome="refused") == 0.0
    m.count_call("Embed", grpc.StatusCode.INTERNAL.name)
    assert _sample(m, "reid_errors_total", code="INTERNAL") == 1.0
