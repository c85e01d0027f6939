"""Celery end to end: a real worker process and a producer, 200 tasks with results, and
tasks that retry twice before they succeed."""
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def worker(broker, name, cleanup):
    queue = name + "-celery"
    cleanup.queue(queue)
    cleanup.exchange(queue)
    env = {**os.environ, "CELERY_BROKER_URL": broker.url, "CELERY_QUEUE": queue, "PYTHONPATH": HERE}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        # The solo pool: Celery 5.5's threads pool stalls ~10 s between prefetch batches,
        # against RabbitMQ as much as against Warren (measured), which only slows CI.
        [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool=solo", "-Q", queue,
         "--loglevel=WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield env, proc, log
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def worker_log(log):
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


@pytest.mark.timeout(240)
def test_200_tasks_with_results_and_retries(worker):
    env, proc, log = worker
    os.environ["CELERY_BROKER_URL"] = env["CELERY_BROKER_URL"]
    os.environ["CELERY_QUEUE"] = env["CELERY_QUEUE"]
    sys.path.insert(0, HERE)
    import celery_app
    from celery.result import ResultSet

    app = celery_app.app
    app.conf.broker_url = env["CELERY_BROKER_URL"]
    app.conf.task_default_queue = env["CELERY_QUEUE"]
    try:
        results = [celery_app.add.delay(i, i) for i in range(200)]
        retried = [celery_app.flaky.delay(i) for i in range(5)]
        # join_native collects results as they arrive (rpc:// backend), instead of one
        # blocking get() per task.
        assert ResultSet(results).join_native(timeout=150) == [2 * i for i in range(200)]
        assert ResultSet(retried).join_native(timeout=60) == [[10 * i, 2] for i in range(5)]
    except Exception:
        print("worker alive:", proc.poll() is None, "\n--- worker log ---\n" + worker_log(log))
        raise
    finally:
        app.close()
