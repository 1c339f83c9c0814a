"""Progress without a terminal: plain lines at most every LOG_EVERY_S seconds, with the time left."""

from __future__ import annotations

from salora_merge import progress


def test_line_log_prints_at_most_every_interval_with_an_estimate(capsys):
    now = [0.0]
    log = progress._LineLog("generating", 10, every=30.0, clock=lambda: now[0])
    for t in (5.0, 10.0, 31.0, 40.0, 65.0):
        now[0] = t
        log.update(2)
    now[0] = 70.0
    log.finish()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["  generating: 6/10, 31s so far, about 21s left",
                     "  generating: done in 1m10s"]  # 8/10 at 40 s is within 30 s of the last line; 10/10 is the end


def test_tqdm_progress_without_a_terminal_starts_and_counts(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress.tqdm_progress("evaluating", 3) as advance:
        advance(1)
        advance(2)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "evaluating (3) ..." and err[1].startswith("  evaluating: 1/3") and "done in" in err[-1]
