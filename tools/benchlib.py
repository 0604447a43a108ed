"""Shared by the benchmark scripts: interleaved timing, process memory and threads, and writing one section of
docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _proc_status(field: str) -> str | None:
    """A field of /proc/self/status (Linux), e.g. ``VmRSS``; None elsewhere or when absent."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].split()[0] for ln in lines if ln.startswith(field + ":")), None)


def rss_mb() -> float:
    """Resident memory of this process, MB (NaN where /proc is missing)."""
    kb = _proc_status("VmRSS")
    return int(kb) / 1024 if kb else float("nan")


def os_threads() -> int:
    """OS threads of this process (-1 where /proc is missing)."""
    n = _proc_status("Threads")
    return int(n) if n else -1


def open_fds() -> int:
    """File descriptors this process holds open (-1 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


class SubscriberThread:
    """A thread reading every ``streamtsm`` message from a ZeroMQ endpoint: the benchmarks that watch a run from
    outside it. Each message goes to :meth:`on_message` (receive time, payload) under ``self.lock``; a subclass
    sets its own fields before calling ``__init__``, which starts the thread."""

    def __init__(self, endpoint: str, name: str = "bench-subscriber") -> None:
        self.lock = threading.Lock()
        self.last_recv = time.monotonic()
        self.ready = threading.Event()  # set by the first message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint,), name=name, daemon=True)
        self._thread.start()

    def on_message(self, received: float, payload: dict) -> None:
        raise NotImplementedError

    def _run(self, endpoint: str) -> None:
        from streamtsm.publish import Subscriber  # not at the top: light tools import this module too

        with Subscriber(endpoint, ["streamtsm"]) as sub:
            while not self._stop.is_set():
                msg = sub.recv(timeout=0.1)
                if msg is None:
                    continue
                now = time.time()
                self.last_recv = time.monotonic()
                self.ready.set()
                with self.lock:
                    self.on_message(now, msg[1])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def cpu_ticks() -> tuple[int, ...] | None:
    """Ticks of all CPUs since boot from /proc/stat (Linux; None elsewhere): user, nice, system, idle, iowait, irq,
    softirq, steal. Steal is time the hypervisor ran something else while this virtual machine had work to run: on
    a shared host it is capacity the benchmark did not get, so benchmarks of capacity report it for their window."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    return tuple(int(v) for v in fields[1:9])


def steal_share(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> float:
    """Stolen share of the CPU time between two :func:`cpu_ticks` samples (NaN without them)."""
    if before is None or after is None or sum(after) == sum(before):
        return float("nan")
    return (after[7] - before[7]) / (sum(after) - sum(before))


def busy_seconds(before: tuple[int, ...], after: tuple[int, ...]) -> float:
    """CPU seconds the whole machine spent not idle (every process, ours and others', and steal) between two
    :func:`cpu_ticks` samples."""
    idle = (after[3] - before[3]) + (after[4] - before[4])  # idle + iowait
    return (sum(after) - sum(before) - idle) / os.sysconf("SC_CLK_TCK")


def stat_cpu_seconds(stat: str) -> float:
    """User + system CPU seconds from a /proc ``stat`` file (``/proc/<pid>/stat``: a process, all its threads;
    ``/proc/self/task/<tid>/stat``: one thread); NaN when it cannot be read (the process ended; not Linux)."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(name_of: Callable[[threading.Thread], str]) -> dict[int, tuple[str, float]]:
    """CPU seconds of each live Python thread of this process by native id: (``name_of(thread)``, seconds), from
    /proc (Linux; empty elsewhere). Threads that are not Python's (a library's own pools) are not in it."""
    out = {}
    for t in threading.enumerate():
        seconds = stat_cpu_seconds(f"/proc/self/task/{t.native_id}/stat")
        if seconds == seconds:  # not NaN: the thread still runs
            out[t.native_id] = (name_of(t), seconds)
    return out


def thread_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two :func:`thread_cpu` samples, summed by name."""
    spent: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        spent[name] = spent.get(name, 0.0) + cpu - before.get(tid, (name, 0.0))[1]
    return spent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def interleaved(cases: dict[str, Callable[[], object]], iterations: int, warmup: int = 5) -> dict[str, list[float]]:
    """Time each case ``iterations`` times, round-robin, so drifts in machine load hit every case alike.

    Returns per-case lists of milliseconds.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(iterations):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p99, mean) in ms."""
    return pct(samples, 50), pct(samples, 99), statistics.fmean(samples)


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the section ``key`` of docs/benchmarks.md, stamped with command, machine and date."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0], DOC.parents[1]), *sys.argv[1:]])
    stamp = (f"Command: `{command}`  \nMachine: {machine()}  \n"
             f"Date: {datetime.date.today().isoformat()}\n")
    section = f"<!-- bench:{key} -->\n## {title}\n\n{stamp}\n{body.rstrip()}\n<!-- /bench:{key} -->\n"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nEach section is written by the tool named in its command line.\n\n"
    pattern = re.compile(rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
