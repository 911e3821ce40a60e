"""The studio's HTTP server: Python's own ``http.server`` (one thread per request) with a fixed
table of routes, a JSON API the page polls, and nothing served from disk but the page's three
files and the gallery's images by their exact names.

| route | what |
| --- | --- |
| ``GET /`` , ``GET /static/app.js``, ``GET /static/style.css`` | the page |
| ``GET /api/config`` | samplers, grids, modes, limits |
| ``GET /api/models`` | the models of the folder (:mod:`difflab.studio.catalogue`) |
| ``POST /api/jobs`` | submit a request of one client (a tab): its job id and place in the queue |
| ``GET /api/jobs?client=ID`` | that client's jobs: status, progress, preview, results |
| ``POST /api/cancel`` | cancel one of the client's jobs |
| ``GET /api/gallery``, ``GET /gallery/NAME`` | the gallery's entries and files |
| ``POST /api/params`` | a dropped PNG -> its parameters (and the stored input images of an edit) |

Every refusal is a JSON ``{"error": message}`` with a 4xx status; a request never stops the
server. POSTs must be ``application/json`` (a page of another site cannot send that without a
CORS preflight, which is never granted) and the ``Host`` header must name this server (no DNS
rebinding).
"""
from __future__ import annotations

import json
import re
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from ..core.grids import GRIDS
from ..samplers import SAMPLERS
from .catalogue import MODES, list_models, resolve_model
from .forms import MAX_BATCH, MAX_STEPS, MODEL_GRID, check_request, decode_image, size_text
from .gallery import Gallery
from .jobs import Job, JobQueue
from .params import read_png_parameters
from .runner import Runner, data_url

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}
CLIENT = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
DRAIN_LIMIT = 256 * 2**20  # bodies over the limit but under this are read and dropped, so the page gets the answer
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"}


class RequestError(Exception):
    """A refusal: HTTP ``status`` and the message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class StudioServer(ThreadingHTTPServer):
    """The server and the studio's state: the models folder, the gallery, the queue."""

    daemon_threads = True

    def __init__(self, models, gallery, *, host: str = "127.0.0.1", port: int = 0, device="cpu",
                 max_upload_bytes: int = 4 * 2**20, quiet: bool = True):
        super().__init__((host, port), Handler)
        self.models, self.max_upload, self.quiet = models, int(max_upload_bytes), quiet
        self.gallery = Gallery(gallery)
        self.runner = Runner(self.gallery, device)
        self.queue = JobQueue(self.runner)
        self.max_body = 3 * self.max_upload + 2**20  # an image and a mask in base64, and the form
        self.page = {path: resources.files(__package__).joinpath("static", name).read_bytes() for path, (name, _) in STATIC.items()}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def hosts(self) -> set:
        """The ``Host`` headers this server answers: its address, and localhost for a loopback one."""
        host, port = self.server_address[:2]
        names = {host} | ({"localhost", "127.0.0.1"} if host in ("127.0.0.1", "localhost") else set())
        return {f"{h}:{port}" for h in names}

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="studio-server", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.shutdown()
        self.queue.stop()
        self.server_close()

    # ------------------------------------------------------------------------------------------
    # The API, one method per route; each returns a JSON-able object or raises RequestError/ValueError

    def config(self, query) -> dict:
        return {"samplers": sorted(SAMPLERS), "grids": [MODEL_GRID, *GRIDS], "modes": list(MODES), "max_steps": MAX_STEPS,
                "max_batch": MAX_BATCH, "max_upload_bytes": self.max_upload}

    def list_models(self, query) -> dict:
        return {"models": [e.public() for e in list_models(self.models)]}

    def submit(self, body: dict) -> dict:
        client = check_client(body.get("client"))
        entry = resolve_model(self.models, body.get("model"))
        request = check_request(body, entry, self.max_upload)
        job = self.queue.submit(Job(client, request))
        return {"id": job.id, "position": len(self.queue.waiting)}

    def jobs(self, query) -> dict:
        return {"jobs": self.queue.for_client(check_client(query.get("client", [""])[0]))}

    def cancel(self, body: dict) -> dict:
        client = check_client(body.get("client"))
        if not self.queue.cancel(str(body.get("id")), client):
            raise RequestError(404, f"job {body.get('id')!r} is not a queued or running job of this tab")
        return {"cancelled": True}

    def gallery_entries(self, query) -> dict:
        return {"entries": self.gallery.entries()}

    def read_params(self, body: dict) -> dict:
        image = decode_image(body.get("image"), "image", self.max_upload)
        params = read_png_parameters(image)
        inputs = {}
        for key in ("init_image", "mask_image"):
            path = self.gallery.input_file(params.get(key))
            if path is not None:
                with Image.open(path) as im:
                    inputs[key] = data_url(im)
        return {"params": params, "inputs": inputs}


def check_client(value) -> str:
    """The client id of a tab; a RequestError when it is not one."""
    if not isinstance(value, str) or not CLIENT.match(value):
        raise RequestError(400, "client: a tab's id of 8 to 64 letters, digits, '-' or '_' is needed (reload the page)")
    return value


def not_found(path: str):
    raise RequestError(404, f"no page {path!r} here")


class Handler(BaseHTTPRequestHandler):
    server: StudioServer
    server_version = "difflab-studio"
    timeout = 60  # seconds a connection may stay silent before its thread lets it go

    GETS = {"/api/config": "config", "/api/models": "list_models", "/api/jobs": "jobs", "/api/gallery": "gallery_entries"}
    POSTS = {"/api/jobs": "submit", "/api/cancel": "cancel", "/api/params": "read_params"}

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)

    def send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj) -> None:
        self.send(status, json.dumps(obj).encode(), "application/json")

    def answer(self, work) -> None:
        """Run ``work()`` and answer its object, or the refusal's message."""
        try:
            if self.headers.get("Host") not in self.server.hosts():
                raise RequestError(421, f"this studio answers only to {sorted(self.server.hosts())}")
            self.send_json(200, work())
        except RequestError as e:
            self.send_json(e.status, {"error": str(e)})
        except (ValueError, FileNotFoundError) as e:
            self.send_json(400, {"error": str(e)})
        except Exception as e:  # the server outlives any request: answer, log, go on
            traceback.print_exc(file=sys.stderr)
            self.send_json(500, {"error": f"internal error ({type(e).__name__}): {e}"})

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path in STATIC:
            self.answer_static(url.path)
        elif url.path.startswith("/gallery/"):
            self.answer_file(url.path[len("/gallery/"):])
        elif url.path in self.GETS:
            self.answer(lambda: getattr(self.server, self.GETS[url.path])(parse_qs(url.query)))
        else:
            self.answer(lambda: not_found(url.path))

    def answer_static(self, path: str) -> None:
        if self.headers.get("Host") not in self.server.hosts():
            return self.send_json(421, {"error": "wrong Host"})
        self.send(200, self.server.page[path], STATIC[path][1])

    def answer_file(self, name: str) -> None:
        path = self.server.gallery.file(name)
        if path is None or self.headers.get("Host") not in self.server.hosts():
            return self.send_json(404, {"error": f"no gallery file {name!r}"})
        self.send(200, path.read_bytes(), "image/png" if name.endswith(".png") else "application/json")

    def do_POST(self):
        path = urlsplit(self.path).path
        self.answer(lambda: self.post(path))

    def post(self, path: str):
        if path not in self.POSTS:
            raise RequestError(404, f"no action {path!r} here")
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            raise RequestError(415, "send JSON (Content-Type: application/json)")
        body = self.read_body()
        return getattr(self.server, self.POSTS[path])(body)

    def read_body(self) -> dict:
        """The JSON object of the request body; refused when too large (read and dropped first, so the
        page sees the answer) or not a JSON object."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(411, "the request has no Content-Length") from None
        if length < 0:
            raise RequestError(400, "the request's Content-Length is negative")
        limit = self.server.max_body
        if length > limit:
            if length <= DRAIN_LIMIT:
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(2**20, remaining))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            else:
                self.close_connection = True
            raise RequestError(413, f"the upload is too large: {size_text(int(self.headers['Content-Length']))} sent, "
                                    f"uploads are limited to {size_text(self.server.max_upload)} per image")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            raise RequestError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body


def make_server(models, gallery, **kwargs) -> StudioServer:
    """A studio over the models folder ``models`` writing to ``gallery`` (module doc; keywords as
    :class:`StudioServer`'s). It listens once made; ``serve_forever`` or ``serve_in_thread`` serves."""
    return StudioServer(models, gallery, **kwargs)


__all__ = ["StudioServer", "make_server", "Handler", "RequestError", "check_client"]
