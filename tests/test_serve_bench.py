"""`multipy bench serve`'s plan: interleaved rounds, every server measured in the
same rounds, a row the median of its windows.  No server and no wrk run here:
the servers and the load generator are stand-ins that record what was asked."""

from __future__ import annotations

import itertools

import pytest

from multipy.bench import serve as bench_serve
from multipy.bench.serve import schedule


def test_every_round_measures_every_server_at_every_connection_count():
    plan = list(schedule(["multipy", "echo", "litserve", "mosec"], [1, 16, 64], 3))
    for k in range(3):
        windows = [(s, c) for r, s, c in plan if r == k]
        assert sorted(windows) == sorted(itertools.product(
            ["multipy", "echo", "litserve", "mosec"], [1, 16, 64]))


def test_each_round_starts_with_another_server():
    plan = list(schedule(["a", "b", "c"], [1, 64], 3))
    firsts = [next(s for r, s, c in plan if r == k) for k in range(3)]
    lasts = [[s for r, s, c in plan if r == k][-1] for k in range(3)]
    assert firsts == ["a", "b", "c"]
    assert lasts == ["c", "a", "b"]


class _Server:
    """A stand-in for a started server."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log
        self.url = f"http://{name}/"
        log.append(("start", name))

    def cpu_seconds(self) -> float:
        return 0.0

    def pss_mb(self) -> float:
        return {"ours": 400.0, "peer": 600.0}[self.name]

    def stop(self) -> None:
        self.log.append(("stop", self.name))


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """Two servers and a wrk whose figures say which window of which server it was."""
    log: list = []
    windows = itertools.count()

    def wrk(url, body, connections, seconds):
        name = url.split("/")[2]
        n = next(windows)
        log.append(("wrk", name, connections, seconds))
        # requests/s rises with every window: the median is the middle round's
        return float(n), 1.0 + n, 2.0 + n, 1

    monkeypatch.setattr(bench_serve.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(bench_serve, "_wrk", wrk)
    monkeypatch.setattr(bench_serve, "_servers", lambda *a, **k: [
        (name, lambda archive, body, name=name: _Server(name, log)) for name in ("ours", "peer")])
    return log


def test_rows_are_medians_of_interleaved_rounds_with_every_server_running(stand_ins):
    rows, notes = bench_serve.measure_serve(models=("identity",), connections=(1, 8),
                                            seconds=6, rounds=3, peers=())
    log = stand_ins
    measured = [(entry[1], entry[2]) for entry in log if entry[0] == "wrk" and entry[3] == 2]
    # both servers started before the first window, stopped after the last one
    assert log[:2] == [("start", "ours"), ("start", "peer")]
    assert log[-2:] in ([("stop", "peer"), ("stop", "ours")], [("stop", "ours"), ("stop", "peer")])
    assert measured == [("ours", 1), ("ours", 8), ("peer", 1), ("peer", 8),
                        ("peer", 1), ("peer", 8), ("ours", 1), ("ours", 8),
                        ("ours", 1), ("ours", 8), ("peer", 1), ("peer", 8)]
    by = {(r.server, r.connections): r for r in rows}
    assert [(r.server, r.connections) for r in rows] == [("ours", 1), ("ours", 8),
                                                         ("peer", 1), ("peer", 8)]
    # window numbers start after the two 1 s warm-ups (0 and 1)
    ours_1 = [2.0, 8.0, 10.0]   # the windows of ("ours", 1): rounds 1, 2, 3
    assert by["ours", 1].requests_per_s == sorted(ours_1)[1]
    assert by["ours", 1].p50_ms == 1.0 + sorted(ours_1)[1]
    assert by["ours", 1].errors == 3 and by["ours", 1].rounds == 3
    assert by["peer", 8].pss_mb == 600.0
    assert any("not being measured" in note for note in notes)


def test_a_row_is_the_median_of_its_windows_not_the_mean():
    row = bench_serve._median_row("s", "m", 1, [(100.0, 1.0, 9.0, 0), (90.0, 5.0, 3.0, 2),
                                                 (1000.0, 2.0, 4.0, 1)], 1.0)
    assert (row.requests_per_s, row.p50_ms, row.p99_ms, row.errors) == (100.0, 2.0, 4.0, 3)
