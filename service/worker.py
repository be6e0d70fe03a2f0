"""Celery, wired to the Flask app: tasks run inside an app context, so they reach the same store."""
from __future__ import annotations

import os
from pathlib import Path

from celery import Celery, Task
from celery.signals import after_setup_logger, after_setup_task_logger

from service.logging import WithoutClientData

#: how often the outbox is turned into tasks, and how often partner pull schedules are checked
DISPATCH_EVERY_SECONDS = 2.0
PULL_CHECK_EVERY_SECONDS = 60.0


def default_broker_url(home: Path) -> str:
    """The embedded broker: Celery over SQLAlchemy on a SQLite file, so sync works with nothing installed."""
    return f"sqla+sqlite:///{home / 'broker.db'}"


@after_setup_logger.connect
@after_setup_task_logger.connect
def _without_client_data(logger, **_kwargs) -> None:
    """A worker's logs as the service's: an exception by its type and frames, never its message
    (Celery sets up its own handlers in the worker process, where ``casebridge serve``'s are not)."""
    for handler in logger.handlers:
        if not any(isinstance(f, WithoutClientData) for f in handler.filters):
            handler.addFilter(WithoutClientData())


def celery_init_app(app, broker_url: str) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery(app.name, task_cls=FlaskTask)
    celery.conf.update(
        broker_url=broker_url,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        beat_schedule={
            "dispatch-outbox": {"task": "casebridge.dispatch_outbox", "schedule": DISPATCH_EVERY_SECONDS},
            "pull-due-partners": {"task": "casebridge.pull_due_partners", "schedule": PULL_CHECK_EVERY_SECONDS},
        },
        imports=("service.tasks",),
    )
    if broker_url.split(":", 1)[0] in ("redis", "rediss", "sqs"):
        # a task a dead worker had taken is given to another after this many seconds (keep it above the
        # longest retry countdown, or a waiting retry is delivered twice: harmless, pushes are idempotent).
        # Only these transports know the option; the SQLAlchemy one would hand it to create_engine().
        celery.conf.broker_transport_options = {
            "visibility_timeout": float(os.environ.get("CASEBRIDGE_BROKER_VISIBILITY_TIMEOUT") or 3600)}
    celery.set_default()
    app.extensions["celery"] = celery
    return celery


def run_worker(concurrency: int = 2, beat: bool = False, loglevel: str = "INFO", pool: str = "prefork") -> None:
    """A Celery worker (optionally with the schedule) for the app configured by CASEBRIDGE_* variables.

    The embedded SQLite broker is a single-machine queue: there the worker uses threads; against Redis
    or RabbitMQ (CASEBRIDGE_BROKER_URL) any number of workers on any number of machines share the work.
    """
    from service import create_app

    app = create_app()
    celery = app.extensions["celery"]
    argv = ["worker", f"--loglevel={loglevel}", f"--concurrency={concurrency}", f"--pool={pool}",
            "--without-gossip", "--without-mingle"]
    if beat:
        argv.append("--beat")
        argv.append(f"--schedule={app.extensions['casebridge'].settings.home / 'beat-schedule'}")
    celery.worker_main(argv)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run a casebridge sync worker.")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--beat", action="store_true", help="also run the schedule (outbox dispatch, pulls)")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "threads", "solo"])
    parser.add_argument("--loglevel", default="INFO")
    options = parser.parse_args()
    run_worker(options.concurrency, options.beat, options.loglevel, options.pool)
