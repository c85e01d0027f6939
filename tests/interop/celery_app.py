"""A tiny Celery app for the end-to-end test: results over rpc://, a task that retries.

CELERY_BROKER_URL and CELERY_QUEUE come from the test, so runs never share a queue."""
import os

from celery import Celery

app = Celery("warren_interop", broker=os.environ["CELERY_BROKER_URL"], backend="rpc://")
app.conf.update(
    task_default_queue=os.environ.get("CELERY_QUEUE", "celery"),
    task_acks_late=True,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=3,
    worker_hijack_root_logger=False,
    result_expires=300,
)
if os.environ.get("CELERY_DELAYED"):
    # Celery's native delayed delivery (5.5+): quorum queues, and countdowns travel
    # through 28 chained `celery_delayed_*` topic exchanges with TTL queues.
    app.conf.update(
        task_default_queue_type="quorum",
        task_default_exchange_type="topic",
        task_default_exchange=os.environ.get("CELERY_QUEUE", "celery"),
        task_default_routing_key=os.environ.get("CELERY_QUEUE", "celery"),
        worker_detect_quorum_queues=True,
        broker_native_delayed_delivery_queue_type="quorum",
    )


@app.task
def add(x, y):
    return x + y


@app.task(bind=True, max_retries=5)
def flaky(self, n):
    """Fails twice, then succeeds: exercises retries (a republish with countdown)."""
    if self.request.retries < 2:
        raise self.retry(countdown=0.1, exc=RuntimeError("try again"))
    return [n * 10, self.request.retries]
