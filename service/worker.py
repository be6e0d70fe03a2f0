"""Celery, wired to the Flask app: tasks run inside an app context, so they reach the same store."""
from __future__ import annotations

from pathlib import Path

from celery import Celery, Task

#: how often the outbox is turned into tasks, and how often partner pull schedules are checked
DISPATCH_EVERY_SECONDS = 2.0
PULL_CHECK_EVERY_SECONDS = 60.0


def default_broker_url(home: Path) -> str:
    """The embedded broker: Celery over SQLAlchemy on a SQLite file, so sync works with nothing installed."""
    return f"sqla+sqlite:///{home / 'broker.db'}"


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
    if broker_url.startswith("sqla+"):
        celery.conf.broker_transport_options = {"polling_interval": 0.2}
    celery.set_default()
    app.extensions["celery"] = celery
    return celery
