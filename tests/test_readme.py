"""The README's Python quick start runs as written (with fewer training steps)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    code = "\n".join(blocks)
    assert "steps=2000" in code
    scope = {}
    exec(compile(code.replace("steps=2000", "steps=4"), "README.md", "exec"), scope)
    assert tuple(scope["samples"].shape) == (10, 1, 8, 8)
    assert tuple(scope["x0"].shape) == (4, 1, 8, 8)
    assert (tmp_path / "runs" / "quickstart" / "checkpoint.safetensors").exists()
