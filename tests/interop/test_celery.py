"""Celery end to end: a real worker process and a producer, 200 tasks with results, and
tasks that retry twice before they succeed; countdowns by Celery's native delayed
delivery (quorum queues, 28 chained exchanges)."""
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def worker(request, broker, name, cleanup):
    queue = name + "-celery"
    cleanup.queue(queue)
    cleanup.exchange(queue)
    env = {**os.environ, "CELERY_BROKER_URL": broker.url, "CELERY_QUEUE": queue, "PYTHONPATH": HERE}
    if getattr(request, "param", None) == "delayed":
        env["CELERY_DELAYED"] = "1"
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


def producer(env):
    """The test's own Celery app, configured as the worker's."""
    for k in ("CELERY_BROKER_URL", "CELERY_QUEUE", "CELERY_DELAYED"):
        if k in env:
            os.environ[k] = env[k]
        else:
            os.environ.pop(k, None)
    sys.path.insert(0, HERE)
    import importlib

    import celery_app
    return importlib.reload(celery_app)


@pytest.mark.timeout(240)
def test_200_tasks_with_results_and_retries(worker):
    env, proc, log = worker
    celery_app = producer(env)
    from celery.result import ResultSet

    app = celery_app.app
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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker", ["delayed"], indirect=True)
def test_countdown_by_native_delayed_delivery(worker):
    """kombu publishes a countdown task to `celery_delayed_27` and it falls through the
    chain of exchanges by its routing key's bits; Warren once stopped routing after 16
    exchange hops and lost every such task."""
    import time
    env, proc, log = worker
    celery_app = producer(env)
    app = celery_app.app
    try:
        # A first task answered: the worker is up and has bound its queue to the end of
        # the delay chain (its DelayedDelivery step runs before it consumes).
        assert celery_app.add.delay(1, 1).get(timeout=30) == 2
        started = time.time()
        later = celery_app.add.apply_async((2, 3), countdown=2)
        assert later.get(timeout=30) == 5
        assert time.time() - started >= 1.9, "the countdown was not kept"
    except Exception:
        print("worker alive:", proc.poll() is None, "\n--- worker log ---\n" + worker_log(log))
        raise
    finally:
        app.close()
