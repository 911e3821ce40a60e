"""``difflab studio``: serve the local web app over a models folder (docs/studio.md)."""
from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from ..studio import list_models, make_server
from .common import UsageError, device, device_name, positive_float

HELP = "a local web app to generate and edit images with the models of a folder, in the browser"
DESCRIPTION = ("Serve difflab studio on 127.0.0.1 (another address only with --host): pick a model of --models, generate, "
               "edit (img2img, inpainting, outpainting, inversion), see the gallery; every image keeps its parameters.")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(s) -> None:
    s.add_argument("--models", type=Path, required=True,
                   help="the folder of models to serve: run folders of difflab train / demo, difflab text models, diffusers "
                        "folders; nothing outside it is ever read")
    s.add_argument("--gallery", type=Path, default=None, help="where images are written (default: MODELS/../studio-gallery)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0 picks a free one)")
    s.add_argument("--max-upload-mb", type=positive_float, default=4.0, help="largest image upload in MiB (default: 4)")
    s.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--verbose", action="store_true", help="log every HTTP request")


def check_host(host: str) -> str:
    """``host`` when it is an IP address or localhost; a UsageError otherwise."""
    if host == "localhost":
        return host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--host {host!r} is not an IP address (e.g. 127.0.0.1, the default, or 0.0.0.0 for every "
                         "interface)") from None
    return host


def run(args) -> int:
    # 1. Check the arguments before listening.
    if not args.models.is_dir():
        raise UsageError(f"--models {args.models} is not a folder (give the folder holding your models)")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} must be from 0 to 65535")
    host = check_host(args.host)
    gallery = args.gallery or args.models.resolve().parent / "studio-gallery"
    if gallery.exists() and not gallery.is_dir():
        raise UsageError(f"--gallery {gallery} is a file; give a folder (it is created when missing)")
    models = list_models(args.models)
    # 2. Listen and serve until Ctrl-C.
    try:
        server = make_server(args.models, gallery, host=host, port=args.port, device=device(args.device),
                             max_upload_bytes=int(args.max_upload_mb * 2**20), quiet=not args.verbose)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{args.port}: {e.strerror or e}") from None
    if host not in LOOPBACK:
        print(f"difflab studio: listening on {host}: other machines can reach it", file=sys.stderr)
    print(f"difflab studio: {len(models)} models in {args.models}, images to {gallery}")
    print(f"difflab studio: open {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0
