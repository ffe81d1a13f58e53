"""MQTT inference summaries: what the Publisher sends, and that a failed publish fails nothing."""

import json
import threading
import urllib.request

import pytest
from conftest import app_module, read_png, wait_healthy

Publisher = app_module.Publisher
TOPIC = "test/brain-segmentation/inferences"


class FakeClient:
    """Stands in for greengrasssdk.client('iot-data'): keeps what it is asked to publish."""

    def __init__(self):
        self.messages = []

    def publish(self, topic, payload):
        self.messages.append((topic, payload))


class FailingClient:
    """A client whose core is unreachable."""

    def publish(self, topic, payload):
        raise ConnectionError("the Greengrass core is not reachable")


@pytest.fixture
def serve_with(model):
    """Start a real server publishing through a given client; returns its base URL."""
    servers = []

    def start(client):
        settings = app_module.Settings(host="127.0.0.1", port=0, threads=2, mqtt_topic=TOPIC)
        app = app_module.create_app(
            settings, model=model, publisher=Publisher(settings.mqtt_topic, client=client)
        )
        server = app_module.start_server(settings, app)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        url = f"http://127.0.0.1:{server.effective_port}"
        wait_healthy(url)
        return url

    yield start
    for server, thread in servers:
        # Close from the server's own loop: closing under its running select() raises EBADF.
        server.trigger.pull_trigger(server.close)
        thread.join(timeout=5)
        assert not thread.is_alive()


def post(url, body):
    """POST raw PNG bytes to /segment; returns (status, content type, body)."""
    request = urllib.request.Request(
        url + "/segment", data=body, method="POST", headers={"Content-Type": "image/png"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_each_inference_publishes_one_small_summary(serve_with, model, t1_png):
    client = FakeClient()
    status, content_type, body = post(serve_with(client), t1_png)
    assert (status, content_type) == (200, "image/png")
    assert read_png(body).shape == read_png(t1_png).shape

    assert len(client.messages) == 1
    topic, payload = client.messages[0]
    assert topic == TOPIC
    summary = json.loads(payload)
    assert summary["model_id"] == model.model_id
    assert (summary["height"], summary["width"]) == read_png(t1_png).shape
    fractions = summary["fractions"]
    assert list(fractions) == model.meta["classes"]
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-3)
    for stage in ("decode_ms", "inference_ms", "encode_ms"):
        assert float(summary[stage]) >= 0
    # A summary, not the image: MQTT messages should stay small and carry no pixels.
    assert len(payload) < 1024
    assert "iVBOR" not in payload  # base64 of a PNG signature
    assert not any(isinstance(v, str) and len(v) > 64 for v in summary.values())


def test_failing_client_does_not_fail_the_request(serve_with, t1_png, caplog):
    status, content_type, body = post(serve_with(FailingClient()), t1_png)
    assert (status, content_type) == (200, "image/png")
    assert body.startswith(b"\x89PNG")
    assert "MQTT publish" in caplog.text and "not reachable" in caplog.text


def test_failed_publish_returns_false():
    assert Publisher(TOPIC, client=FailingClient()).publish({"a": 1}) is False
    client = FakeClient()
    assert Publisher(TOPIC, client=client).publish({"a": 1}) is True
    assert client.messages == [(TOPIC, '{"a": 1}')]


def test_no_client_outside_greengrass_is_a_no_op(monkeypatch):
    monkeypatch.delenv("MY_FUNCTION_ARN", raising=False)
    publisher = Publisher(TOPIC)
    assert publisher.client is None
    assert publisher.publish({"model_id": "x"}) is False


def test_greengrass_arn_without_a_core_disables_publishing(monkeypatch, caplog):
    # greengrasssdk imports modules that only the Greengrass runtime provides.
    monkeypatch.setenv("MY_FUNCTION_ARN", "arn:aws:lambda:eu-west-1:123456789012:function:brainSeg")
    publisher = Publisher(TOPIC)
    assert publisher.client is None
    assert publisher.publish({"model_id": "x"}) is False
    assert "MQTT summaries disabled" in caplog.text
