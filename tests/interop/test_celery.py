"""Celery end to end: a real worker process and a producer, 200 tasks with results."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def worker(broker):
    env = {**os.environ, "CELERY_BROKER_URL": broker.url, "PYTHONPATH": HERE}
    proc = subprocess.Popen(
        # The solo pool: Celery 5.5's threads pool stalls ~10 s between prefetch batches,
        # against RabbitMQ as much as against Warren (measured), which only slows CI.
        [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool=solo",
         "--loglevel=WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    yield env
    proc.terminate()
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.timeout(180)
def test_200_tasks_with_results_and_retries(worker):
    os.environ["CELERY_BROKER_URL"] = worker["CELERY_BROKER_URL"]
    sys.path.insert(0, HERE)
    import celery_app

    from celery.result import ResultSet

    results = [celery_app.add.delay(i, i) for i in range(190)]
    retried = [celery_app.flaky.delay(i) for i in range(10)]
    # join_native collects results as they arrive (rpc:// backend), instead of one
    # blocking get() per task.
    assert ResultSet(results).join_native(timeout=120) == [2 * i for i in range(190)]
    assert ResultSet(retried).join_native(timeout=120) == [10 * i for i in range(10)]
