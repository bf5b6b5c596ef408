"""Helpers of the awaited-call tests (test_awaited_ring, test_awaited_send,
test_reply_poll): a served request's call, and the books it leaves behind."""


def call_on_loop(model, *args, **kwargs):
    """What a served request sends: an awaited call read on the loop (on_loop=True)."""
    manager = model._manager
    request = manager._replicated_request(model, None, args, kwargs, None)
    return manager._dispatcher.submit_async(request, on_loop=True)


def books(manager) -> dict:
    """The books calls leave behind: calls, latencies, failures (counts), and what
    must be back to nothing once none is in flight (posted calls in flight, their
    entries, the worker locks, the balancer's counts)."""
    workers = manager._workers
    return {"calls": sum(w.calls for w in workers),
            "latencies": sum(len(w.latencies) for w in workers),
            "failures": sum(w.failures for w in workers),
            "in_flight": [w.posted_in_flight for w in workers],
            "posted": [len(getattr(w, "_posted", ())) for w in workers],
            "locked": [w.lock.locked() for w in workers],
            "load": list(manager._balancer._load)}


def idle(interpreters: int) -> dict:
    """The books of ``books`` with no call in flight."""
    return {"in_flight": [0] * interpreters, "posted": [0] * interpreters,
            "locked": [False] * interpreters, "load": [0] * interpreters}


def delta(before: dict, after: dict) -> dict:
    """``after`` less ``before`` for the counts; the rest as they are ``after``."""
    return {k: after[k] - before[k] if isinstance(after[k], int) else after[k] for k in after}
