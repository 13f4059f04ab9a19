"""The benchmark's CPU accounting (project/bench/cpu.py): a process tree counts the children
it has waited for, a window is read between samples, PostgreSQL's backends are told apart
by their database, and the table has a row per component."""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg
import pytest

from project.bench import cpu, report, run

# A child that runs a grandchild to the end (waiting for it), then works itself, each for
# a given CPU time (not wall time: the machine is shared), then idles until it exits.
BURN = "import time\nwhile time.process_time() < {seconds}: pass\n"
TREE = (
    "import subprocess, sys, time\n"
    f"subprocess.run([sys.executable, '-c', {BURN.format(seconds=0.3)!r}], check=True)\n"
    + BURN.format(seconds=0.3)
    + "time.sleep(0.5)\n"
)


def test_a_tree_counts_the_children_it_waited_for_and_keeps_a_root_that_exited() -> None:
    pids: list[int] = []
    with cpu.CpuSampler(lambda: {"tree": pids}) as sampler:
        began = time.time()
        child = subprocess.Popen([sys.executable, "-c", TREE])
        pids.append(child.pid)
        assert child.wait(timeout=30) == 0
        time.sleep(0.3)  # samples after the exit: the root's last reading stays
        ended = time.time()
    used = sampler.usage(began, ended, delivered=100)

    assert used["cpu_seconds"]["tree"] >= 0.55  # 0.3 + 0.3 of work, counted to the tick
    assert used["cpu_seconds"]["components"] == used["cpu_seconds"]["tree"]
    assert used["cpu_seconds"]["machine"] >= 0.8 * used["cpu_seconds"]["tree"]
    assert used["cpu_ms_per_email"]["tree"] == round(1000 * used["cpu_seconds"]["tree"] / 100, 3)
    assert used["cores"] >= 1 and 0 < used["cores_busy"] <= used["cores"] + 0.1  # /proc/stat counts in ticks


def test_a_window_is_read_between_the_samples_around_its_ends() -> None:
    sampler = cpu.CpuSampler(lambda: {}, shares={"part": ("x", lambda pid: True)})
    sampler.samples = [
        (100.0, {"x": 0.0, "part": 0.0, "machine": 0.0}),
        (101.0, {"x": 1.0, "part": 0.5, "machine": 2.0}),
        (102.0, {"x": 1.0, "part": 0.5, "y": 0.4, "machine": 3.0}),
    ]
    used = sampler.usage(100.5, 101.5, delivered=10)

    assert used["cpu_seconds"] == {"x": 0.5, "part": 0.25, "y": 0.2, "machine": 1.5, "components": 0.7}
    assert used["cpu_ms_per_email"]["x"] == 50.0 and used["cpu_ms_per_email"]["machine"] == 150.0
    assert used["cores_busy"] == 1.5
    assert sampler.usage(99.0, 103.0, 10)["cpu_seconds"]["x"] == 1.0  # outside the samples: the first, the last
    assert sampler.usage(100.0, 101.0, 0)["cpu_ms_per_email"] is None


def test_postgresql_backends_are_told_apart_by_their_database() -> None:
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres") as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        backend = row[0]
        assert cpu.pg_database(backend) == "postgres"
        postmaster = cpu.parent(backend)
        assert postmaster and cpu.pg_database(postmaster) is None
        assert backend in cpu.processes_named("postgres")


def test_the_database_is_read_from_a_process_title(monkeypatch: pytest.MonkeyPatch) -> None:
    titles = {
        1: "postgres: 15/main: postgres bench_ab12cd 127.0.0.1(49740) idle",
        2: "postgres: app shop [local] SELECT",
        3: "postgres: 15/main: autovacuum worker test_other",
        4: "postgres: 15/main: checkpointer",
        5: "postgres: 15/main: logical replication launcher",
        6: "/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main",
    }
    monkeypatch.setattr(cpu, "cmdline", titles.__getitem__)
    assert [cpu.pg_database(pid) for pid in titles] == ["bench_ab12cd", "shop", "test_other", None, None, None]


def test_the_table_has_a_row_per_component_with_the_median_of_the_runs() -> None:
    def phase(worker: float, kafka: bool = False) -> dict[str, object]:
        ms = {"worker": worker, "postgresql": 0.8, "sink": 0.5, "components": worker + 1.3, "machine": worker + 2}
        return {"cpu_ms_per_email": ms | ({"kafka": 0.2} if kafka else {}), "cores_busy": 1.5, "cores": 2}

    runs = [{"ours": {"e2e_single": phase(w)}} for w in (1.0, 3.0, 1.5)]
    merged = run.median(runs)["ours"]["e2e_single"]
    assert merged["cpu_ms_per_email"]["worker"] == 1.5 and merged["cores_busy"] == 1.5

    rows = {row[0].strip(): row[1:] for row in report.cpu_rows([merged, None])}
    assert rows["delivery worker, main + pool (**)"] == ("1.50", "-")
    assert rows["beat (ours: its relay loop)"] == ("-", "-")
    assert rows["whole machine, /proc/stat (not idle or iowait)"] == ("3.50", "-")
    assert rows["cores busy, of 2"] == ("1.50", "-")
    assert "Kafka broker (Tansu)" not in rows
    assert "Kafka broker (Tansu)" in {r[0].strip() for r in report.cpu_rows([phase(1.0, kafka=True)])}
