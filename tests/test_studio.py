"""difflab studio without a browser: A1111 parameters round-trip, model names confined to the
models folder (links out of it too), the queue keeps clients apart and survives failing jobs,
the HTTP API refuses what it must (wrong Host, non-JSON, bodies over the limit, other tabs' jobs)
and keeps serving, and a job run twice from its parameters repeats its pixels."""
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from difflab.studio import Gallery, Job, JobQueue, Runner, format_parameters, list_models, make_server, parse_parameters
from difflab.studio.catalogue import resolve_model
from difflab.studio.forms import check_request, sampler_name
from difflab.studio.params import read_png_parameters, save_png


def test_parameters_round_trip_through_a_png_and_read_a1111_text(tmp_path):
    params = {"prompt": "a seven, thick", "negative_prompt": "blurry: grey", "steps": 7, "sampler": "heun",
              "grid": "karras", "guidance": 2.5, "seed": 12, "size": "16x16", "model": "text16", "mode": "outpaint",
              "outpaint": "4,4,0,0", "batch_size": 3, "batch_pos": 2}
    path = save_png(Image.new("L", (4, 4), 7), tmp_path / "x.png", params)
    with Image.open(path) as im:
        back = read_png_parameters(im)
    assert {k: back[k] for k in params} == params and back["extra"] == {}
    assert json.loads((tmp_path / "x.json").read_text())["parameters"] == format_parameters(params)
    a1111 = parse_parameters('masterpiece\nline two\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M Karras, '
                             'CFG scale: 7, Seed: 5, Size: 512x768, Lora hashes: "a: 1, b: 2", Version: v1.9')
    assert a1111["prompt"] == "masterpiece\nline two" and a1111["negative_prompt"] == "ugly"
    assert (a1111["steps"], a1111["guidance"], a1111["seed"], a1111["size"]) == (20, 7.0, 5, "512x768")
    assert a1111["extra"] == {"Lora hashes": "a: 1, b: 2", "Version": "v1.9"}
    assert sampler_name(a1111["sampler"]) == "dpmpp_2m" and sampler_name("Euler a") == "euler_ancestral"


def test_models_are_named_inside_their_folder_only(studio_models, tmp_path):
    assert [(e.name, e.kind) for e in list_models(studio_models)] == [("digits", "checkpoint"), ("text16", "text")]
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "escape").symlink_to(studio_models / "digits")  # a real model, but outside this folder
    (folder / "broken").mkdir()
    (folder / "broken" / "checkpoint.safetensors").write_bytes(b"not a checkpoint")  # damaged: skipped, not fatal
    (folder / "notes.safetensors").write_bytes(b"\x00" * 16)
    assert list_models(folder) == []
    for name, phrase in (("escape", "leads outside"), ("broken", "not in the models folder"), ("../models", "never by a path"), ("/etc", "never by a path"),
                         ("digits", "not in the models folder"), ("", "choose a model")):
        with pytest.raises(ValueError, match=phrase):
            resolve_model(folder, name)


def test_the_queue_runs_in_order_keeps_clients_apart_and_survives_failures():
    ran = []

    def run(job):
        time.sleep(0.01)
        if job.request == "bad":
            raise ValueError("steps do not fit")
        if job.request == "bug":
            raise RuntimeError("boom")
        ran.append(job.request)
        job.results.append({"request": job.request})

    queue = JobQueue(run)
    queue.submit(Job("blocker1", "first"))
    jobs = [queue.submit(Job(f"client{i % 2}xyz", r)) for i, r in enumerate(["a0", "bad", "a1", "bug", "a2", "b2"])]
    assert queue.cancel(jobs[5].id, "client1xyz") and not queue.cancel(jobs[4].id, "client1xyz")  # not its own
    deadline = time.monotonic() + 10
    while any(j.finished is None for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran == ["first", "a0", "a1", "a2"]
    assert [j.status for j in jobs] == ["done", "error", "done", "error", "done", "cancelled"]
    assert jobs[1].error == "steps do not fit" and "internal error (RuntimeError): boom" == jobs[3].error
    mine = queue.for_client("client0xyz")
    assert [j["results"] for j in mine] == [[{"request": "a0"}], [{"request": "a1"}], [{"request": "a2"}]]
    assert all(j["id"] not in {s["id"] for s in mine} for j in queue.for_client("client1xyz"))
    queue.stop()


def call(url, body=None, headers=None, data=None):
    """(status, JSON) of a GET or a JSON POST."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    payload = data if data is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=payload, headers=headers)
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_the_api_refuses_what_it_must_and_keeps_serving(studio_models, tmp_path):
    server = make_server(studio_models, tmp_path / "gallery", port=0, max_upload_bytes=1000)
    server.serve_in_thread()
    url = server.url
    try:
        status, body, headers = call(url + "api/models")
        assert status == 200 and [m["name"] for m in body["models"]] == ["digits", "text16"]
        assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
        assert call(url + "api/models", headers={"Host": "evil.example:80"})[0] == 421  # DNS rebinding
        assert call(url + "api/jobs", data=b"client=x", headers={"Content-Type": "text/plain"})[0] == 415
        status, body, _ = call(url + "api/jobs", data=b"{" + b" " * (2**20 + 5000) + b"}")
        assert status == 413 and "too large" in body["error"] and "1 KiB" in body["error"]
        assert call(url + "api/jobs", data=b"[1]")[1]["error"] == "the request body must be a JSON object"
        assert "client" in call(url + "api/jobs", {"model": "digits"})[1]["error"]
        assert call(url + "gallery/..%2Fmodels")[0] == 404 and call(url + "nope")[0] == 404
        status, job, _ = call(url + "api/jobs", {"client": "tab-one-1", "model": "digits", "steps": 400, "batch_size": 16})
        assert status == 200
        status, body, _ = call(url + "api/cancel", {"client": "tab-two-2", "id": job["id"]})
        assert status == 404 and "not a queued or running job of this tab" in body["error"]
        assert call(url + "api/jobs?client=tab-two-2")[1] == {"jobs": []}
        assert call(url + "api/cancel", {"client": "tab-one-1", "id": job["id"]})[1] == {"cancelled": True}
        status, body, _ = call(url + "api/jobs", {"client": "tab-one-1", "model": "digits", "steps": 2, "class_label": "3"})
        assert status == 200  # still serving
    finally:
        server.close()


def test_a_job_run_again_from_its_parameters_repeats_its_pixels(studio_models, tmp_path):
    gallery = Gallery(tmp_path / "gallery")
    runner = Runner(gallery)
    entry = resolve_model(studio_models, "text16")
    form = {"prompt": "the digit 3", "negative_prompt": "a seven", "steps": 3, "sampler": "euler_ancestral", "grid": "karras",
            "guidance": 3, "seed": 5, "batch_size": 2}
    job = Job("tab-0000", check_request(form, entry, 2**20))
    runner(job)
    params = parse_parameters(json.loads((gallery.folder / job.results[1]["name"].replace(".png", ".json")).read_text())["parameters"])
    w, h = params["size"].split("x")
    again_form = {**{k: params[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "grid", "guidance", "seed",
                                            "batch_size")}, "width": w, "height": h}
    again = Job("tab-0000", check_request(again_form, resolve_model(studio_models, params["model"]), 2**20))
    runner(again)
    first, second = (np.asarray(Image.open(gallery.folder / j.results[1]["name"])) for j in (job, again))
    assert np.array_equal(first, second) and first.shape == (16, 16)


def test_difflab_studio_serves_its_folder_until_stopped(studio_models, tmp_path, monkeypatch, capsys):
    from difflab.cli import main
    from difflab.cli import studio as command

    made = []
    monkeypatch.setattr(command, "make_server", lambda *a, **k: made.append(make_server(*a, **k)) or made[-1])
    status = []
    thread = threading.Thread(target=lambda: status.append(main(["studio", "--models", str(studio_models), "--port", "0",
                                                                   "--gallery", str(tmp_path / "g"), "--device", "cpu"])))
    thread.start()
    deadline = time.monotonic() + 30
    while not made and time.monotonic() < deadline:
        time.sleep(0.02)
    server = made[0]
    assert server.server_address[0] == "127.0.0.1"  # local unless asked
    assert [m["name"] for m in call(server.url + "api/models")[1]["models"]] == ["digits", "text16"]
    page = urllib.request.urlopen(server.url).read().decode()
    assert "<title>difflab studio</title>" in page and 'src="/static/app.js"' in page
    server.shutdown()
    thread.join(30)
    assert status == [0]
    out = capsys.readouterr().out
    assert f"open {server.url}" in out and "2 models" in out


def test_the_edit_modes_run_through_their_pipelines(studio_models, tmp_path):
    import base64
    import io

    gallery = Gallery(tmp_path / "gallery")
    runner = Runner(gallery)
    entry = resolve_model(studio_models, "text16")
    buffer = io.BytesIO()
    Image.fromarray((np.arange(256).reshape(16, 16)).astype(np.uint8)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    cases = {"img2img": ({"strength": 0.5}, (16, 16)), "outpaint": ({"pads": {"left": 4, "right": 4}}, (16, 24)),
             "invert": ({"source_prompt": "the digit 3", "sampler": "heun"}, (16, 16))}
    for mode, (extra, shape) in cases.items():
        job = Job("tab-0000", check_request({"mode": mode, "prompt": "a seven", "steps": 2, "image": image, **extra}, entry, 2**20))
        runner(job)
        (result,) = job.results
        assert np.asarray(Image.open(gallery.folder / result["name"])).shape == shape, mode
        params = result["params"]
        assert params["mode"] == mode and gallery.input_file(params["init_image"]) is not None
        assert mode != "invert" or params["sampler"] == "ddim"  # inversion runs DDIM whatever was asked
    assert params["source_prompt"] == "the digit 3"
    with Image.open(gallery.input_file(params["init_image"])) as kept:  # the input kept for reproduction, as fed
        assert np.array_equal(np.asarray(kept), np.arange(256).reshape(16, 16))
