"""The corpus pipeline on Ray Data (local instance, 2 CPUs): the same rows as in process, and an actor
killed mid-run loses no row and duplicates none. Skipped when Ray is not installed."""

from __future__ import annotations

import os
import signal
import threading

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from test_corpus import assert_same_rows, bert, cache, mixed_corpus, run  # noqa: E402,F401  (fixtures)

from lrpc.corpus import read_output  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_rows_equal_the_in_process_rows(bert, local_ray, tmp_path):
    corpus = mixed_corpus(tmp_path / "corpus.jsonl", 520)
    run(bert, corpus, tmp_path / "local.parquet", batch_size=16)
    run(bert, corpus, tmp_path / "ray.parquet", batch_size=16, engine="ray", workers=2)
    local, distributed = read_output(tmp_path / "local.parquet"), read_output(tmp_path / "ray.parquet")
    assert local.num_rows > 520 and local["line"].to_pylist() == distributed["line"].to_pylist()
    assert_same_rows(local, distributed)


def test_a_killed_actor_loses_nothing(bert, local_ray, tmp_path):
    """SIGKILL one actor's process as soon as the first window comes back: Ray restarts the actor and
    retries its window; every line is in the output once."""
    from ray._private.state import actors   # the GCS actor table (the state API needs the dashboard)
    corpus = mixed_corpus(tmp_path / "corpus.jsonl", 500)
    run(bert, corpus, tmp_path / "local.parquet", batch_size=4, window=8)
    killed, finished = [], threading.Event()

    def kill_one_actor():   # polls until the run ends (Ray's start-up alone can take half a minute under load)
        while not finished.is_set():
            alive = [a["Pid"] for a in actors(actor_state_name="ALIVE").values() if "MapWorker" in a["ActorClassName"]]
            if alive and list((tmp_path / "ray.parquet.partial").glob("part-*")):
                os.kill(alive[0], signal.SIGKILL)
                killed.append(alive[0])
                return
            finished.wait(0.05)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    try:
        run(bert, corpus, tmp_path / "ray.parquet", batch_size=4, window=8, engine="ray", workers=2)
    finally:
        finished.set()
        killer.join()
    assert killed, "no actor was killed: the run ended before the first window came back"
    local, distributed = read_output(tmp_path / "local.parquet"), read_output(tmp_path / "ray.parquet")
    assert distributed["line"].to_pylist() == local["line"].to_pylist()    # each row once, in order
    assert_same_rows(local, distributed)
