"""``difflab studio``: a local web app over the library (see docs/studio.md).

One concept per module: the models folder (:mod:`.catalogue`), the page's requests checked
(:mod:`.forms`), the queue (:mod:`.jobs`), running a job through the pipelines (:mod:`.runner`),
the gallery (:mod:`.gallery`) and its PNG parameters (:mod:`.params`), the HTTP server
(:mod:`.server`) and the page itself (``static/``).
"""
from .catalogue import ModelEntry, list_models, resolve_model
from .forms import Request, check_request
from .gallery import Gallery
from .jobs import Job, JobCancelled, JobQueue
from .params import format_parameters, parse_parameters, read_png_parameters, save_png
from .runner import Runner
from .server import StudioServer, make_server

__all__ = ["make_server", "StudioServer", "Runner", "JobQueue", "Job", "JobCancelled", "Gallery", "Request", "check_request",
           "ModelEntry", "list_models", "resolve_model", "format_parameters", "parse_parameters", "read_png_parameters",
           "save_png"]
