"""The command line's progress bar, as a terminal shows it."""

import io

from imagemesh_client.cli import ProgressBar


def test_the_progress_bar_shows_the_share_done_and_the_time_left():
    shown = io.StringIO()
    bar = ProgressBar(False, shown)
    bar.status({"status": "running", "progress": {"fraction": 0.4}, "eta_seconds": 6.2})
    assert "? tiles, 40%, about 6 s left" in shown.getvalue()  # one tile, not yet done: still moving
    bar(3, 12)
    bar.status({"status": "running", "progress": {"fraction": 0.3}, "eta_seconds": 0.4})  # never back
    assert shown.getvalue().rstrip().endswith("3/12 tiles, 40%, under a second left")
