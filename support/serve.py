"""`python captioner.py --checkpoint MODEL --serve`: one page where a person drops photos and reads their
captions, served by the standard library's HTTP server.

    GET  /          the page (support/page.html: one self-contained file, no external requests)
    POST /caption   multipart/form-data with one file field "image" and an optional field "beam" (1-8)
                    -> 200 {"caption", "seconds"}, or 4xx {"error"} naming the problem
    anything else   404 (no file is ever served), 405 for another method on these two paths

Requests are answered by threads, but the model captions one photo at a time (a lock), so answers never mix.
A body over MAX_UPLOAD_BYTES, a file that is not an image, a pixel bomb or a truncated JPEG gets an error for
that photo; the server keeps serving.
"""

import email.parser
import io
import email.policy
import http.server
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import urllib.parse

MAX_UPLOAD_BYTES = 20 << 20  # a 20 MB photo; a phone's largest JPEGs are about 12 MB
MAX_BEAM = 8
MAX_PARTS = 8
UPLOADS_AT_ONCE = 4  # bodies read and parsed at the same time: each can take a few times its size in memory
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def image_from_multipart(content_type: str, body: bytes) -> tuple[io.BytesIO, int]:
    """The "image" file field (a file object named as the upload) and the "beam" field (default 1) of a
    multipart/form-data body."""
    if not content_type.startswith("multipart/form-data") or "boundary=" not in content_type:
        raise RequestError(400, "expected multipart/form-data with a boundary")
    if body.count(b"\n--") > MAX_PARTS:  # before parsing: 100,000 tiny parts cost the parser seconds
        raise RequestError(400, f"more than {MAX_PARTS} parts")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart() or message.defects:
        raise RequestError(400, "a malformed multipart body")
    fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    if "image" not in fields:
        raise RequestError(400, "no file field named 'image'")
    data = io.BytesIO(fields["image"].get_payload(decode=True) or b"")
    data.name = fields["image"].get_filename() or "image"
    beam = (fields["beam"].get_payload(decode=True) or b"").decode("ascii", "replace").strip() \
        if "beam" in fields else "1"
    if not beam.isdigit() or not 1 <= int(beam) <= MAX_BEAM:
        raise RequestError(400, f"beam must be a whole number from 1 to {MAX_BEAM}")
    return data, int(beam)


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "captioner"
    timeout = 60  # a client that stops sending mid-request frees its thread

    def do_GET(self):
        if urllib.parse.urlsplit(self.path).path not in ("/", "/index.html"):
            return self.reply(404, {"error": "not found"})
        body = self.server.page
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        # the page needs nothing from anywhere else, and a browser is told so
        self.send_header("Content-Security-Policy", "default-src 'none'; img-src blob: data:; "
                         "style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        if urllib.parse.urlsplit(self.path).path != "/caption":
            return self.reply(404, {"error": "not found"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self.reply(411, {"error": "a Content-Length is needed"})
        if not 0 < length <= MAX_UPLOAD_BYTES:
            self.close_connection = True  # the unread body must not be taken for the next request
            return self.reply(413 if length > 0 else 400, {"error": f"an upload of 1 byte to "
                                                                    f"{MAX_UPLOAD_BYTES >> 20} MB is needed"})
        try:
            with self.server.uploads:
                data, beam = image_from_multipart(self.headers.get("Content-Type", ""), self.rfile.read(length))
        except RequestError as e:
            return self.reply(e.status, {"error": str(e)})
        except Exception:  # whatever else a hostile body makes the parser raise
            return self.reply(400, {"error": "a malformed multipart body"})
        try:
            caption, seconds = self.server.caption(data, beam)
        except ValueError as e:  # not an image, damaged, too many pixels: said for this photo only
            message = str(e).replace(repr(data), repr(data.name))  # PIL names the file object
            return self.reply(503 if "out of memory" in message else 422, {"error": message.split(": ", 1)[-1]})
        except Exception as e:  # a bug, not the photo's fault: said, and the server goes on
            self.log_message("error captioning %s: %s: %s", data.name, type(e).__name__, e)
            return self.reply(500, {"error": f"the server failed on this photo ({type(e).__name__})"})
        self.reply(200, {"caption": caption, "seconds": round(seconds, 3)})

    def not_allowed(self):
        self.send_response(405)
        self.send_header("Allow", "GET" if urllib.parse.urlsplit(self.path).path != "/caption" else "POST")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = not_allowed

    def reply(self, status: int, record: dict):
        body = json.dumps(record).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # one line per request on stderr, without the client's address
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} {format % args}\n")


class CaptionServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, caption_bytes):
        """caption_bytes(file object, beam_size) -> caption: run under a lock, one photo at a time."""
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Handler)
        with open(PAGE, "rb") as f:
            self.page = f.read()
        self._caption_bytes, self._lock = caption_bytes, threading.Lock()
        self.uploads = threading.BoundedSemaphore(UPLOADS_AT_ONCE)

    def caption(self, data: bytes, beam: int) -> tuple[str, float]:
        with self._lock:
            start = time.perf_counter()
            caption = self._caption_bytes(data, beam)
            return caption, time.perf_counter() - start


def serve(caption_bytes, host: str = "127.0.0.1", port: int = 8000):
    """Serve the page until Ctrl-C."""
    server = CaptionServer((host, port), caption_bytes)
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        loopback = False
    if not loopback:
        print(f"warning: serving on {host}, which other machines can reach: anyone there can send photos to "
              f"this model", file=sys.stderr)
    print(f"serving on http://{host}:{server.server_address[1]}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
