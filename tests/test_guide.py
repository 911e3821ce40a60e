"""The guide (docs/guide) cannot rot: every example of examples/guide runs in its --fast mode and the
figures it prints fall inside its BOUNDS; every chapter exists, names its example, shows a committed
picture; the index lists all 50 and the README links the index."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "guide"
GUIDE = ROOT / "docs" / "guide"
SCRIPTS = sorted(EXAMPLES.glob("[0-9][0-9]_*.py"))
LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*) = (\S+)$")


@pytest.fixture(scope="module", autouse=True)
def guide_cache(tmp_path_factory, digits_judge_file):
    """One cache of trained guide models for the whole run (fresh each run: nothing is reused
    from an earlier one; the default judge is the one this run trained, see conftest)."""
    old = os.environ.get("DIFFLAB_GUIDE_CACHE")
    cache = tmp_path_factory.mktemp("guide_cache")
    shutil.copyfile(digits_judge_file, cache / "digits_judge.safetensors")
    os.environ["DIFFLAB_GUIDE_CACHE"] = str(cache)
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))
    if old is None:
        del os.environ["DIFFLAB_GUIDE_CACHE"]
    else:
        os.environ["DIFFLAB_GUIDE_CACHE"] = old


def load(script: Path):
    spec = importlib.util.spec_from_file_location(f"guide_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def printed_figures(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for line in text.splitlines() if (m := LINE.match(line.strip()))}


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_example_prints_figures_inside_its_bounds(script, tmp_path):
    module = load(script)
    assert isinstance(module.BOUNDS, dict) and module.BOUNDS, f"{script.name} states no BOUNDS"
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            returned = module.main(["--fast", "--out", str(tmp_path), "--seed", "0"])
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    printed = printed_figures(out.getvalue())
    for name, (low, high) in module.BOUNDS.items():
        assert name in printed, f"{script.name} did not print {name}; it printed {sorted(printed)}"
        value = printed[name]
        assert math.isfinite(value) and low <= value <= high, f"{script.name}: {name} = {value} outside [{low}, {high}]"
        assert returned[name] == pytest.approx(value, rel=1e-5, abs=1e-9)
    pictures = [p for p in tmp_path.iterdir() if p.name.startswith(script.stem[:3]) and p.stat().st_size > 500]
    assert pictures, f"{script.name} wrote no picture into --out"


def chapters() -> list[Path]:
    return sorted(GUIDE.glob("[0-9][0-9]-*.md"))


@pytest.mark.parametrize("chapter", chapters(), ids=[c.stem for c in chapters()])
def test_chapter_names_its_example_and_shows_a_committed_picture(chapter):
    text = chapter.read_text()
    number = chapter.name[:2]
    assert text.startswith(f"# {int(number)}. "), f"{chapter.name} must start with '# {int(number)}. <title>'"
    assert re.search(r"^> \S", text, re.M), f"{chapter.name} needs a one-line '> summary' (the index uses it)"
    examples = re.findall(rf"examples/guide/({number}_\w+\.py)", text)
    assert examples and all((EXAMPLES / e).exists() for e in examples), f"{chapter.name} names no existing example"
    pictures = re.findall(r"\]\((images/[^)\s]+)\)", text)
    assert pictures, f"{chapter.name} shows no picture"
    for p in pictures:
        assert (GUIDE / p).exists() and (GUIDE / p).stat().st_size > 500, f"{chapter.name}: {p} is not committed"
    for link in re.findall(r"\]\(((?:\.\./)+[^)#\s]+)", text):
        assert (chapter.parent / link).resolve().exists(), f"{chapter.name} links to a missing {link}"


def test_all_fifty_chapters_each_with_an_example_and_the_index_lists_them():
    numbers = [int(c.name[:2]) for c in chapters()]
    assert numbers == list(range(1, 51)), f"chapters missing: {sorted(set(range(1, 51)) - set(numbers))}"
    assert {int(s.name[:2]) for s in SCRIPTS} == set(range(1, 51))
    index = (GUIDE / "index.md").read_text()
    for c in chapters():
        assert f"({c.name})" in index, f"docs/guide/index.md does not list {c.name}"
    assert "docs/guide/index.md" in (ROOT / "README.md").read_text()
