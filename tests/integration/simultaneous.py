"""Requests sent at the same moment, for the tests of what concurrent writers may and may not do."""
from __future__ import annotations

import threading


def at_once(app, send, count: int = 2) -> list:
    """``send(client, i)`` from ``count`` threads released together, each with its own test client."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i: int) -> None:
        client = app.test_client()
        try:
            barrier.wait(timeout=30)
            results[i] = send(client, i)
        except BaseException as error:  # noqa: BLE001 - surfaced below
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a writer is still running after two minutes"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
