"""Progress when output is not a terminal: a few plain lines, never a redrawn bar."""
import io

from difflab.progress import PlainProgress, progress_bar, progress_range


def test_plain_progress_prints_the_start_each_quarter_and_the_end():
    out = io.StringIO()
    bar = PlainProgress(100, desc="sampling", unit="img", file=out)
    for _ in range(100):
        bar.update(1)
    bar.set_postfix(loss="0.1")
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["sampling: 0/100 (0%)", "sampling: 25/100 (25%)",
                                                      "sampling: 50/100 (50%)", "sampling: 75/100 (75%)",
                                                      "sampling: 100/100 (100%)"]
    assert "img/s" in lines[-1] and "loss 0.1" in lines[-1] and "\r" not in out.getvalue()


def test_big_updates_and_disabled_bars():
    out = io.StringIO()
    bar = PlainProgress(10, desc="x", file=out)
    bar.update(8)  # one jump past three quarters: one line, not three
    bar.update(2)
    bar.close()
    assert len(out.getvalue().splitlines()) == 3
    quiet = io.StringIO()
    bar = PlainProgress(10, disable=True, file=quiet)
    bar.update(10)
    bar.write("hello")
    bar.close()
    assert quiet.getvalue() == ""


def test_without_a_terminal_the_bar_is_plain(capsys):
    assert isinstance(progress_bar(5, desc="d"), PlainProgress)  # pytest's stderr is not a terminal
    assert list(progress_range(0, 10, 3, desc="steps")) == [0, 3, 6, 9]
    err = capsys.readouterr().err
    assert "steps: 0/4 (0%)" in err and "steps: 4/4 (100%)" in err and "\r" not in err
