"""Brain MRI tissue segmentation over HTTP: the Greengrass Lambda handler and the web app.

POST a PNG slice to port 5000 and get back a palette PNG mask of the same size whose pixel
values are 0 background, 1 CSF, 2 grey matter, 3 white matter.

Three ways to run the same code:
- Greengrass (V1 pinned Lambda, or V2 running it as a Lambda): the runtime imports this
  module with MY_FUNCTION_ARN set; the import starts the server once in a background thread
  and returns at once. `lambda_handler` reports the server's status, or segments an image
  sent in the event.
- Standalone: `python greengrassBrainSegmentationApp.py [--host H] [--port P] [--model-dir D]
  [--runtime R]`; `--check` only loads the model, runs it once and says what runs it.
- In tests: `create_app(settings)` builds a fresh app; `start_server(settings)` serves it.
"""

import argparse
import base64
import ctypes
import hmac
import io
import json
import logging
import os
import sys
import threading
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

from flask import Flask, Request, Response, after_this_request, jsonify, request
from werkzeug.exceptions import HTTPException

import load_model
import processing
import qc
import volumes

log = logging.getLogger("segmentation.app")
VERSION = "1.0.0"
PAGE = Path(__file__).resolve().parent / "page.html"  # the browser page for GET /


@dataclass
class Settings:
    """Every setting, with its environment variable; CLI flags of the same name override."""

    host: str = "0.0.0.0"  # HOST
    port: int = 5000  # PORT
    model_dir: str = ""  # MODEL_DIR; empty = search Greengrass paths, then bundled
    runtime: str = "auto"  # RUNTIME: auto (the first that runs), openvino, onnxruntime, mxnet
    passes: int = 2  # PASSES: 2 = each slice also upside down, scores averaged; 1 = half the work
    threads: int = 4  # THREADS: waitress worker threads
    max_upload_mb: float = 64.0  # MAX_UPLOAD_MB: larger bodies get 413
    max_volume_megavoxels: float = 32.0  # MAX_VOLUME_MEGAVOXELS: larger volumes get 413
    upload_memory_mb: float = 200.0  # UPLOAD_MEMORY_MB: request bodies held at once, all clients
    work_megapixels: float = 21.0  # WORK_MEGAPIXELS: slices decoded and segmented at once
    connection_limit: int = 250  # CONNECTION_LIMIT: open connections before accepting pauses
    channel_timeout: int = 30  # CHANNEL_TIMEOUT: seconds an idle connection is kept
    api_token: str = ""  # API_TOKEN: when set, every route but /health needs it
    mqtt_topic: str = "brain-segmentation/inferences"  # MQTT_TOPIC, used under Greengrass
    log_level: str = "INFO"  # LOG_LEVEL

    @property
    def max_upload_bytes(self):
        """MAX_UPLOAD_MB in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, environ=None, **overrides):
        """Defaults, then environment variables, then explicit overrides that are not None."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            raw = environ.get(field.name.upper())
            if raw not in (None, ""):
                try:
                    values[field.name] = field.type(raw) if field.type is not str else raw
                except ValueError:
                    raise SystemExit(
                        f"error: {field.name.upper()}={raw!r} is not a valid {field.type.__name__}"
                    ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if settings.passes not in processing.PASSES:
            raise SystemExit(f"error: PASSES={settings.passes} must be 1 or 2")
        return settings


class ServiceUnavailable(Exception):
    """No model is loaded; answered with 503."""

    status = 503


class Unauthorised(Exception):
    """API_TOKEN is set and the request does not carry it; answered with 401."""

    status = 401


class InMemoryRequest(Request):
    """A request whose multipart parts stay in memory (werkzeug spools parts over 500 KB to
    a temporary file, and an uploaded slice must never reach the disk). The body is already
    bounded by MAX_UPLOAD_MB before Flask sees it."""

    def _get_file_stream(
        self, total_content_length, content_type, filename=None, content_length=None
    ):
        return io.BytesIO()


class Publisher:
    """Publishes a JSON summary of each inference over Greengrass MQTT; a no-op elsewhere."""

    def __init__(self, topic, client=None):
        self.topic = topic
        self.client = client
        if client is None and os.environ.get("MY_FUNCTION_ARN"):
            try:
                import greengrasssdk

                self.client = greengrasssdk.client("iot-data")
            except Exception as error:  # outside a core the SDK cannot connect
                log.warning("MQTT summaries disabled: %s", error)

    def publish(self, summary):
        """Send one summary; never raises, a failed publish must not fail the request."""
        if self.client is None:
            return False
        try:
            self.client.publish(topic=self.topic, payload=json.dumps(summary))
            return True
        except Exception as error:
            log.warning("MQTT publish to %s failed: %s", self.topic, error)
            return False


def create_app(settings=None, model=None, publisher=None):
    """Build the Flask app. Loads the model unless given one; without a model it answers 503."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    state = {
        "model": model,
        "error": None,
        "started": time.time(),
        "work": PixelBudget(settings.work_megapixels * 1e6),
    }
    if model is None:
        try:
            state["model"] = load_model.load(
                settings.model_dir or None, settings.runtime, settings.passes
            )
        except load_model.ModelError as error:
            state["error"] = str(error)
            log.error("no model loaded: %s", error)
    publisher = publisher or Publisher(settings.mqtt_topic)
    app.extensions["segmentation"] = state

    def current_model():
        if state["model"] is None:
            raise ServiceUnavailable(f"no model loaded: {load_error()}")
        return state["model"]

    def has_token():
        header = request.headers.get("Authorization", "")
        expected = f"Bearer {settings.api_token}"
        return bool(settings.api_token) and hmac.compare_digest(header.encode(), expected.encode())

    def load_error():
        # The loader's message names filesystem paths: only for a caller with the token.
        if has_token():
            return state["error"]
        return "the model could not be loaded; the service log (or /health with the token) says why"

    def wants_page():
        # Browsers ask for text/html first; curl (*/*) and programs keep getting JSON.
        accept = request.accept_mimetypes
        return (
            request.path == "/"
            and request.method == "GET"
            and (accept.best_match(["application/json", "text/html"]) == "text/html")
        )

    @app.before_request
    def check_token():
        # The page holds no data and asks for the token itself, so a browser may load it.
        if (
            settings.api_token
            and request.path != "/health"
            and not has_token()
            and not (wants_page())
        ):
            raise Unauthorised("this server needs the header 'Authorization: Bearer <API_TOKEN>'")

    @app.get("/")
    def usage():
        if wants_page() and PAGE.exists():
            page = PAGE.read_text().replace("TOKEN_REQUIRED", "yes" if settings.api_token else "no")
            response = Response(page, mimetype="text/html")
            response.headers["Vary"] = "Accept"
            # Everything is inline: nothing from another origin, and no framing elsewhere.
            response.headers["Content-Security-Policy"] = (
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "img-src data: blob:; connect-src 'self' data:; frame-ancestors 'none'"
            )
            return response
        return jsonify(
            {
                "service": "brain MRI tissue segmentation",
                "version": VERSION,
                "usage": "POST a PNG slice to / or /segment (raw body or multipart "
                "field 'file'); the response is a palette PNG mask",
                "volumes": "POST a NIfTI file or a DICOM series zip to /volume; the response "
                "is a label NIfTI (?format=json: tissue volumes in mL; ?format=png: a mosaic)",
                "page": "open this address in a browser",
                "accepts": processing.ACCEPTED,
                "health": "/health",
                "model": "/model",
            }
        )

    @app.post("/")
    @app.post("/segment")
    def segment():
        model = current_model()
        overlay = request.args.get("overlay", "0").lower() in ("1", "true", "yes")
        body, summary = segment_png(model, read_upload(), state["work"], overlay)
        publisher.publish(summary)
        if summary["width"] * summary["height"] >= LARGE_SLICE_PIXELS:
            after_this_request(trim_when_sent)
        response = Response(body, mimetype="image/png")
        response.headers.update(
            {
                "X-Decode-Ms": str(summary["decode_ms"]),
                "X-Inference-Ms": str(summary["inference_ms"]),
                "X-Forward-Ms": str(summary["forward_ms"]),
                "X-Encode-Ms": str(summary["encode_ms"]),
                "X-Model-Id": model.model_id,
                "X-Runtime": model.runtime.name,
                "X-Classes": ",".join(model.meta["classes"]),
            }
        )
        return response

    @app.post("/volume")
    def volume():
        model = current_model()
        plane = request.args.get("plane") or None
        if plane is not None and plane not in (*volumes.PLANES, volumes.ALL):
            raise volumes.VolumeError(
                f"unknown plane {plane!r}; use ?plane=axial, coronal, sagittal or all"
            )
        kind = volume_format()
        after_this_request(trim_when_sent)  # a volume's arrays are all large
        parts = read_upload(many=True)
        limit = int(settings.max_volume_megavoxels * 1e6)
        body, summary = segment_volume(model, parts, plane, kind, limit, state["work"])
        publisher.publish({k: v for k, v in summary.items() if k != "viewer"})
        if kind == "json":
            return jsonify(summary)
        if kind == "viewer":
            return jsonify({**summary, "labels_nifti_base64": base64.b64encode(body).decode()})
        mimetype = "image/png" if kind == "png" else "application/gzip"
        response = Response(body, mimetype=mimetype)
        name = "labels-mosaic.png" if kind == "png" else "labels.nii.gz"
        response.headers.update(
            {
                "Content-Disposition": f'attachment; filename="{name}"',
                "X-Decode-Ms": str(summary["decode_ms"]),
                "X-Inference-Ms": str(summary["inference_ms"]),
                "X-Encode-Ms": str(summary["encode_ms"]),
                "X-Model-Id": model.model_id,
                "X-Classes": ",".join(model.meta["classes"]),
                "X-Plane": summary["plane"],
                "X-Brain-Ml": str(summary["brain_ml"]),
            }
        )
        return response

    def volume_format():
        kind = request.args.get("format")
        if kind is None:
            best = request.accept_mimetypes.best_match(["application/gzip", "application/json"])
            kind = "json" if best == "application/json" else "nifti"
        if kind not in VOLUME_FORMATS:
            raise volumes.VolumeError(
                f"unknown format {kind!r}; use ?format=nifti, json, png or viewer"
            )
        return kind

    @app.get("/health")
    def health():
        uptime = round(time.time() - state["started"], 1)
        if state["model"] is None:
            return jsonify(
                {
                    "status": "unavailable",
                    "model_loaded": False,
                    "error": load_error(),
                    "uptime_s": uptime,
                }
            ), 503
        model = state["model"]
        return jsonify(
            {
                "status": "ok",
                "model_loaded": True,
                "model_id": model.model_id,
                "model_name": model.meta["name"],
                "model_dir": model_dir(model),
                "runtime": model.runtime.name,
                "passes": model.passes,
                "input_channels": model.meta["input_channels"],
                "uptime_s": uptime,
                "version": VERSION,
            }
        )

    @app.get("/model")
    def model_facts():
        model = current_model()
        return jsonify({**model.describe(), "model_dir": model_dir(model)})

    def model_dir(model):
        # The folder's name for anyone; where it lies on the box only with the token.
        return str(model.directory) if has_token() else os.path.basename(str(model.directory))

    @app.errorhandler(processing.ImageError)  # volumes' errors are ImageErrors too
    @app.errorhandler(ServiceUnavailable)
    @app.errorhandler(Unauthorised)
    def known_error(error):
        response = jsonify({"error": str(error)})
        response.status_code = error.status
        if error.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.errorhandler(HTTPException)
    def http_error(error):
        messages = {
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"the upload is larger than {settings.max_upload_mb:g} MB",
            404: f"no route {request.path}; POST slices to / or /segment, scans to /volume",
        }
        response = jsonify({"error": messages.get(error.code, error.description)})
        response.status_code = error.code
        if error.code == 405:
            response.headers["Allow"] = ", ".join(error.valid_methods or [])
        return response

    @app.errorhandler(Exception)
    def internal_error(error):
        log.exception("internal error on %s %s", request.method, request.path)
        return jsonify({"error": "internal error; the server logged it and keeps serving"}), 500

    return app


def segment_png(model, data, work=None, overlay=False):
    """PNG bytes -> (mask PNG bytes, summary): decode, segment, encode, each stage timed.

    With `overlay` the body is instead the slice with the mask blended in the class colours.

    `work`, a PixelBudget, bounds the pixels all requests decode and segment at once. The
    summary (model id, size, timings, class fractions, never pixels) is what the MQTT
    publisher sends and what the response headers report.
    """
    width, height = processing.png_size(data)
    with work.hold(width * height) if work else nullcontext():
        started = time.perf_counter()
        slice_ = processing.decode_png(data)
        decoded = time.perf_counter()
        timings = {}
        mask = model.segment(slice_, timings)
        inferred = time.perf_counter()
        if overlay:
            body = qc.slice_overlay(slice_, mask, model.meta["colours"])
        else:
            body = processing.encode_mask(mask, model.meta["colours"])
        encoded = time.perf_counter()
    return body, {
        "model_id": model.model_id,
        "runtime": model.runtime.name,
        "width": mask.shape[1],
        "height": mask.shape[0],
        "decode_ms": ms(decoded - started),
        "inference_ms": ms(inferred - decoded),
        "forward_ms": timings["forward_ms"],
        "encode_ms": ms(encoded - inferred),
        "total_ms": ms(encoded - started),
        "time": round(time.time(), 3),
        "fractions": processing.class_fractions(mask, model.meta["classes"]),
    }


# --- Memory --------------------------------------------------------------------------------
# glibc's malloc keeps what it once held: each thread gets its own arena (heap), and blocks
# freed under the mmap threshold, which rises to the largest block freed (up to 32 MB), stay
# in them. After mixed slices up to 4096² the server sat 150-250 MB above its steady state.
# So the server keeps one arena and, after a large upload, hands its free pages back; within
# a request freed arrays are reused as before (a fixed threshold, mapping each array afresh,
# made 1024² to 4096² slices 25-45 % slower and the soak's throughput a third lower).

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
LARGE_SLICE_PIXELS = 1024 * 1024  # a slice this large (and any volume) is followed by a trim


def glibc():
    """The C library when it is glibc, else None (musl, macOS, Windows: nothing is tuned)."""
    try:
        if os.confstr("CS_GNU_LIBC_VERSION"):
            return ctypes.CDLL(None)
    except (AttributeError, OSError, ValueError):  # no confstr, or no such name
        pass
    return None


def one_malloc_arena():
    """All threads allocate from glibc's main arena; call once before the server's threads
    start. Returns whether it was set (not where MALLOC_ARENA_MAX already says otherwise).

    Only the main arena's top is given back by malloc_trim, and the worker threads' large
    arrays are few, so sharing one arena costs no measurable time here.
    """
    libc = glibc()
    if libc is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, 1))


def trim_malloc():
    """Give the free pages of malloc's heap back to the system (glibc's malloc_trim).

    Only after large uploads: the next request has to fault the pages in again.
    """
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def trim_when_sent(response):
    """An after_this_request hook: trim_malloc once the response is sent, when the request's
    arrays are freed."""
    response.call_on_close(trim_malloc)
    return response


class PixelBudget:
    """Pixels being decoded and segmented at once, all requests together.

    Memory per request grows with its pixels: a 4096x4096 slice waits until it fits, while
    small slices go on beside it, so neither memory nor a small slice's wait depends on what
    other clients send.
    """

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self.room = threading.Condition()

    @contextmanager
    def hold(self, pixels):
        """Wait until `pixels` fit (a slice larger than the whole budget waits for all of it)."""
        pixels = min(pixels, self.limit)
        with self.room:
            self.room.wait_for(lambda: self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self.room:
                self.used -= pixels
                self.room.notify_all()


def segment_volume(model, parts, plane, kind, max_voxels, work=None):
    """Upload parts -> (body, summary): decode, segment every slice, encode, each stage timed.

    `kind` is nifti (labels .nii.gz), json (no body), png (a QC mosaic) or viewer (the
    page's slice sheets in the summary and the labels .nii.gz as body).
    """
    started = time.perf_counter()
    volume = volumes.read_volume(parts, max_voxels)
    decoded = time.perf_counter()
    with work.hold(volume.data.size) if work else nullcontext():
        labels, plane, count = volumes.segment(model, volume, plane)
    inferred = time.perf_counter()
    classes = model.meta["classes"]
    summary = {
        "model_id": model.model_id,
        "source": volume.source,
        "shape": list(volume.shape),
        "voxel_mm": [round(float(z), 4) for z in volume.zooms],
        "orientation": "".join(volumes.nib.aff2axcodes(volume.affine)),
        "plane": plane,
        "slices": count,
        "classes": classes,
        **volumes.tissue_volumes(labels, volume, classes),
    }
    body = b""
    if kind in ("nifti", "viewer"):
        body = volumes.encode_labels(labels, volume, classes)
    if kind in ("png", "viewer"):
        shown = volumes.acquisition_plane(volume) if plane == volumes.ALL else plane
        pictures = qc.VolumePictures(volume, labels, shown, model.meta["colours"], classes)
        if kind == "png":
            body = pictures.mosaic()
        else:
            summary["viewer"] = pictures.viewer()
    encoded = time.perf_counter()
    summary.update(
        {
            "decode_ms": ms(decoded - started),
            "inference_ms": ms(inferred - decoded),
            "encode_ms": ms(encoded - inferred),
            "total_ms": ms(encoded - started),
            "time": round(time.time(), 3),
        }
    )
    log.info(
        "volume %s %s: %d %s slices in %.1f s",
        volume.source,
        "x".join(map(str, volume.shape)),
        count,
        plane,
        encoded - started,
    )
    return body, summary


VOLUME_FORMATS = ("nifti", "json", "png", "viewer")


def read_upload(many=False):
    """The upload's bytes: multipart field 'file', or else the raw body.

    With `many`, a list of every 'file' part (DICOM files of one series may come apart).
    """
    if request.mimetype == "multipart/form-data":
        uploads = request.files.getlist("file")
        if not uploads:
            raise processing.ImageError(
                "the multipart form has no field 'file'; send curl -F file=@slice.png"
            )
        if many:
            return [upload.read() for upload in uploads]
        if len(uploads) > 1:
            raise processing.ImageError(
                f"the multipart form has {len(uploads)} fields 'file'; send one slice per request"
            )
        return uploads[0].read()
    body = request.get_data(cache=False)
    return [body] if many else body


def ms(seconds):
    """Seconds -> milliseconds, rounded to 0.1."""
    return round(seconds * 1000, 1)


def start_server(settings=None, app=None):
    """Create a waitress server (not yet running); `server.effective_port` is the bound port.

    Bodies over MAX_UPLOAD_MB are refused from their Content-Length, before they are read
    (also under `Expect: 100-continue`); bodies under it stay in memory, never in a temporary
    file, and all connections together hold at most UPLOAD_MEMORY_MB of them (503 beyond).
    """
    from waitress.server import create_server

    settings = settings or Settings.from_env()
    app = app or create_app(settings)
    limit = settings.max_upload_bytes
    server = create_server(
        app,
        host=settings.host,
        port=settings.port,
        threads=settings.threads,
        ident="brain-segmentation",
        max_request_body_size=limit + 1,  # waitress refuses bodies >= this; Flask > MAX_UPLOAD
        inbuf_overflow=limit + 2,  # a body under the limit is never spooled to a temp file
        outbuf_overflow=max(limit, 16 * 1024 * 1024),  # nor is a mask on its way out
        connection_limit=settings.connection_limit,
        channel_timeout=settings.channel_timeout,
        cleanup_interval=min(10, settings.channel_timeout),
        asyncore_use_poll=True,  # select() cannot watch file descriptors past 1024
        expose_tracebacks=False,
    )
    server.channel_class = channel_class(UploadMemory(settings.upload_memory_mb * 1024 * 1024))
    # waitress warns at every request that waits for a worker thread: under load thousands
    # of lines an hour on a Pi's SD card, saying only that the PixelBudget queue is working
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return server


class UploadMemory:
    """The request bytes all connections may hold in memory at once, shared by their parsers."""

    def __init__(self, limit):
        self.limit = limit
        self.lock = threading.Lock()
        self.held = weakref.WeakKeyDictionary()  # parser -> bytes; a dropped parser frees its share

    def reserve(self, parser, size):
        """Grow `parser`'s share to `size` bytes; False if that would pass the limit."""
        with self.lock:
            others = sum(self.held.values()) - self.held.get(parser, 0)
            if others + size > self.limit:
                return False
            self.held[parser] = size
            return True

    def release(self, parser):
        """Give back `parser`'s share."""
        with self.lock:
            self.held.pop(parser, None)


def channel_class(upload_memory):
    """A waitress channel whose requests share `upload_memory` and whose errors are JSON."""
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.task import ErrorTask
    from waitress.utilities import Error

    class Busy(Error):
        code = 503
        reason = "Service Unavailable"

    class Parser(HTTPRequestParser):
        """waitress's parser, plus the shared memory cap and an early answer on errors."""

        def received(self, data):
            consumed = super().received(data)
            if self.error is None and self.headers_finished:
                size = max(self.content_length, self.body_bytes_received)
                if size and not upload_memory.reserve(self, size):
                    self.error = Busy("the server is receiving too many uploads; retry shortly")
                    self.completed = True
            if self.error is not None:
                # waitress would send "100 Continue" and read the body before refusing it.
                self.expect_continue = False
            return consumed

        def close(self):
            super().close()
            upload_memory.release(self)

    class JSONErrorTask(ErrorTask):
        """waitress's own error replies (400, 413, 431, 501, 503) as {"error": ...} JSON."""

        def execute(self):
            error = self.request.error
            limit_mb = (self.channel.adj.max_request_body_size - 1) / 1024 / 1024
            messages = {
                400: f"the HTTP request is malformed ({error.body})",
                413: f"the upload is larger than {limit_mb:g} MB",
                431: "the request headers are too large",
                500: "internal error; the server logged it and keeps serving",
            }
            body = json.dumps({"error": messages.get(error.code, error.body)}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class Channel(HTTPChannel):
        parser_class = Parser
        error_task_class = JSONErrorTask

        def handle_close(self):
            if self.request is not None:  # a body cut off mid-way gives its share back now
                self.request.close()
            super().handle_close()

    return Channel


# --- Greengrass Lambda -------------------------------------------------------------------

_background = {
    "server": None,
    "app": None,
    "thread": None,
    "error": None,
    "ready": threading.Event(),
}
_background_lock = threading.Lock()
READY_TIMEOUT_S = 120  # a Pi 3 takes seconds to import MXNet and bind the model


def start_in_background(settings=None):
    """Start the server once in a daemon thread; later calls return the same thread."""
    with _background_lock:
        if _background["thread"] is not None:
            return _background["thread"]

        def serve():
            try:
                one_malloc_arena()
                app = create_app(settings)
                server = start_server(settings, app)
                _background["app"], _background["server"] = app, server
                log.info("serving on port %s", server.effective_port)
            except (Exception, SystemExit) as error:  # a Lambda has no terminal: log, report
                _background["error"] = str(error) or type(error).__name__
                log.error(
                    "the segmentation server did not start: %s",
                    _background["error"],
                    exc_info=not isinstance(error, SystemExit),  # a bad setting needs no trace
                )
                return
            finally:
                _background["ready"].set()
            server.run()

        thread = threading.Thread(target=serve, name="segmentation-server", daemon=True)
        _background["thread"] = thread
        thread.start()
        return thread


def server_status():
    """The background server: {"state": starting|serving|failed, "port", "model_id", "error"}."""
    server, error = _background["server"], _background["error"]
    if error:
        return {"state": "failed", "port": None, "model_id": None, "error": error}
    if server is None:
        return {"state": "starting", "port": None, "model_id": None, "error": None}
    state = _background["app"].extensions["segmentation"]
    model = state["model"]
    return {
        "state": "serving" if model else "failed",
        "port": int(server.effective_port),
        "model_id": model.model_id if model else None,
        "error": state["error"],
    }


def lambda_handler(event, context):
    """Greengrass entry point.

    Any event makes sure the server runs and returns `server_status()` at once. An event
    carrying {"image_png_base64": ...} waits until the server is up, segments the image with
    the server's model and adds "mask_png_base64" and class "fractions" to the status.
    """
    start_in_background()
    if not (isinstance(event, dict) and event.get("image_png_base64")):
        return server_status()
    _background["ready"].wait(READY_TIMEOUT_S)
    status = server_status()
    if status["state"] != "serving":
        return status
    model = _background["app"].extensions["segmentation"]["model"]
    try:
        work = _background["app"].extensions["segmentation"]["work"]
        body, summary = segment_png(model, base64.b64decode(event["image_png_base64"]), work)
    except (processing.ImageError, ValueError) as error:
        return {**status, "error": str(error)}
    return {
        **status,
        "mask_png_base64": base64.b64encode(body).decode(),
        "fractions": summary["fractions"],
    }


# --- Standalone ----------------------------------------------------------------------------


def main(argv=None):
    """Serve in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description="Serve brain MRI tissue segmentation over HTTP.")
    parser.add_argument("--host", help="address to listen on (HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (PORT, default 5000)")
    parser.add_argument("--model-dir", help="model folder (MODEL_DIR, default: search)")
    parser.add_argument("--threads", type=int, help="worker threads (THREADS, default 4)")
    parser.add_argument("--api-token", help="require 'Authorization: Bearer TOKEN' (API_TOKEN)")
    parser.add_argument(
        "--runtime",
        choices=load_model.RUNTIMES,
        help="what runs the network (RUNTIME; default auto: OpenVINO, ONNX Runtime or MXNet)",
    )
    parser.add_argument(
        "--passes",
        type=int,
        choices=processing.PASSES,
        help="2: each slice also upside down, scores averaged; 1: one pass (PASSES, default 2)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="load the model, run it once, say what runs it and exit (0: it would serve)",
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env(
        host=args.host,
        port=args.port,
        model_dir=args.model_dir,
        threads=args.threads,
        api_token=args.api_token,
        runtime=args.runtime,
        passes=args.passes,
    )
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    one_malloc_arena()  # before the model loads and its threads start
    app = create_app(settings)
    model = app.extensions["segmentation"]["model"]
    if model is None:
        sys.exit(f"error: {app.extensions['segmentation']['error']}")
    if args.check:  # the Greengrass V2 recipe's Install step: fail the deployment, not the service
        print(
            f"ok: {model.meta['name']} ({model.model_id}) from {model.directory} runs with "
            f"{model.runtime.name}"
        )
        return
    try:
        server = start_server(settings, app)
    except OSError as error:
        sys.exit(f"error: cannot listen on {settings.host}:{settings.port}: {error.strerror}")
    print(f"serving on http://{settings.host}:{server.effective_port}/", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass


if os.environ.get("MY_FUNCTION_ARN") and __name__ != "__main__":
    # Imported by the Greengrass runtime as a pinned Lambda: serve without blocking the import.
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"))
    start_in_background()

if __name__ == "__main__":
    main()
