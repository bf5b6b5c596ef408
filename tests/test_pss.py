"""PSS of N interpreters against N eager processes (``multipy bench --pss``, the demo)."""

from __future__ import annotations

from multipy.bench.pss import MemoryRow, compare_memory, memory_table_lines


def test_both_sides_are_measured_from_outside_and_tabled(examples):
    (row,) = compare_memory(examples["smallops"], (1,))
    # Each side holds torch at least: tens of MiB, not zero and not the caller's own.
    assert row.n == 1
    assert row.multipy_bytes > 20 << 20 and row.eager_bytes > 20 << 20
    header, line = memory_table_lines([row])
    assert "multipy / one eager" in header
    assert line.split()[0] == "1"


def test_ratios_are_against_one_eager_process_and_n_eager_processes():
    rows = [MemoryRow(1, 300 << 20, 200 << 20), MemoryRow(2, 400 << 20, 400 << 20)]
    lines = memory_table_lines(rows)
    assert lines[2].split()[-2:] == ["2.00x", "1.00x"]
