"""The ETA of a run whose actors took a minute to start: it follows the rate once they run."""
import time

from twig_batch.distributed.progress import Progress


def test_the_eta_follows_the_running_rate_once_it_is_known():
    lines = []
    progress = Progress(total=1000, echo=lines.append, started=time.monotonic() - 70)  # 60 s start, 10 s drawing
    running = None
    progress.steady_rate = lambda: running
    progress.update(100, 0)
    # Before the actors' rate is known, the rate since the start is all there is: 100 images in 70 s.
    assert 600 < progress.eta_s() < 700 and "ETA 10m" in lines[-1]
    running = 10.0  # images/s once the actors run
    progress.report()
    assert 89.0 < progress.eta_s() <= 90.0 and "ETA 1m30s" in lines[-1]
    assert "1.43 images/s" in lines[-1]  # the rate shown is still the run's own, start included


def test_after_the_first_parts_the_eta_uses_the_actors_own_rate_over_them():
    from twig_batch.distributed.run_events import RunEvents

    events = RunEvents(storage=None, info={"attempts": [{}]}, echo=lambda line: None)
    progress = Progress(total=4096, echo=lambda line: None, started=time.monotonic() - 38)  # 25 s of start
    progress.steady_rate = events.running_images_per_s
    assert events.running_images_per_s() is None
    events.add([{"kind": "part", "actor": "a", "images": 128, "draw_s": 16.0},
                {"kind": "part", "actor": "b", "images": 64, "draw_s": 16.0}])
    progress.update(192, 0)
    assert events.running_images_per_s() == 12.0  # 8 + 4 images/s, each actor's first part
    assert (4096 - 192) / 12.0 - 1 < progress.eta_s() <= (4096 - 192) / 12.0  # not (4096 - 192) / (192 / 38)


def test_between_two_parts_the_eta_counts_down_and_stops_at_zero(monkeypatch):
    from twig_batch.distributed import progress as progress_module

    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    lines = []
    progress = Progress(total=64, echo=lines.append, started=now[0] - 60)
    progress.steady_rate = lambda: 32 / 40  # a part of 32 images every 40 s
    progress.update(32, 0)
    assert progress.eta_s() == 40.0 and "ETA 0m40s" in lines[-1]
    now[0] += 15  # no rows in between
    progress.report()
    assert progress.eta_s() == 25.0 and "ETA 0m25s" in lines[-1]
    now[0] += 60  # the next part is late
    assert progress.eta_s() == 0.0
    progress.update(16, 0)  # rows again: the count starts afresh from what is left
    assert progress.eta_s() == 20.0


def test_an_actor_in_the_mixed_loop_counts_its_first_rows_drawing_time_in_its_rate(tmp_path):
    """Its images run side by side: the first rows come after a whole chain of stages, and the rows
    after them were mostly drawn before. Its rate is every row over every second it drew."""
    from twig_batch.distributed.run_events import RunEvents
    from twig_batch.io.storage import open_storage

    events = RunEvents(storage=open_storage(str(tmp_path)), info={"attempts": [{}]}, echo=lambda line: None)
    lines = []
    progress = Progress(total=512, echo=lines.append, drawing=events.actors_drawing)
    progress.report()
    assert "waiting for the first part (actors load the model" in lines[-1]
    events.add([{"kind": "part_size", "actor": "a", "images": 512, "most": 512, "loop": "mixed"}])
    progress.report()
    assert "waiting for the first rows (1 actor(s) drawing)" in lines[-1]
    events.add([{"kind": "part", "actor": "a", "images": 32, "draw_s": 60.0}])
    assert events.steady_images_per_s() == 32 / 60
    events.add([{"kind": "part", "actor": "a", "images": 32, "draw_s": 2.0},
                {"kind": "part", "actor": "a", "images": 32, "draw_s": 2.0}])
    assert events.steady_images_per_s() == 96 / 64  # not 64 images over the 4 s since the first rows
