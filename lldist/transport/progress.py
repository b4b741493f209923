"""Progress of a surface: cells done/total, cells/s, ETA, peak memory.

A tqdm bar on a terminal; plain lines every `every` seconds otherwise (Slurm logs, CI), so a
log file shows progress without carriage-return noise.
"""

from __future__ import annotations

import resource
import sys
import time


def memory() -> str:
    """Peak memory of this process (rank 0): host RSS, and the GPU's peak allocation if any."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    text = f"mem {rss:.0f} MiB"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", gpu {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    return text


def _fmt_s(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """`every` seconds between lines (0: silent, no bar either). `queued`: for a schedule that
    decides as it goes (an adaptive grid), a function giving the cells it has queued or out,
    so the line says what is known to remain instead of counting the whole grid."""

    def __init__(self, total: int, done: int = 0, every: float = 10.0, stream=None, tty=None, queued=None,
                 unit: str = "cell"):
        self.total, self.done, self.start_done = total, done, done
        self.unit = unit  # what is counted: a surface's cells, a series' (checkpoint, measure) units
        self.stream = stream or sys.stderr
        self.every, self.queued = every, queued
        self.t0 = self.last = time.perf_counter()
        notebook = "ipykernel" in sys.modules and stream is None
        tty = (self.stream.isatty() or notebook) if tty is None else tty
        self.bar = None
        if tty and every > 0:
            # a notebook's widget where ipywidgets is installed, else the text bar (tqdm.auto
            # would warn "IProgress not found" without it)
            import importlib.util
            if notebook and importlib.util.find_spec("ipywidgets") is not None:
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm
            self.bar = tqdm(total=None if queued else total, initial=done, unit=unit, file=self.stream,
                            smoothing=0.1, dynamic_ncols=True)

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.done - self.start_done) / dt if dt > 0 else 0.0

    def line(self) -> str:
        r = self.rate()
        elapsed = _fmt_s(time.perf_counter() - self.t0)
        if self.queued is not None:  # the schedule decides as it goes: what it has queued is a floor
            left = self.queued()
            eta = left / r if r > 0 else float("inf")
            return (f"cells {self.done} of at most {self.total} (adaptive; {left} queued, more may follow)  "
                    f"{r:.2f} cells/s  elapsed {elapsed}  ETA at least {_fmt_s(eta)}  {memory()}")
        eta = (self.total - self.done) / r if r > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        u = self.unit
        return (f"{u}s {self.done}/{self.total} ({pct:.0f}%)  {r:.2f} {u}s/s  "
                f"elapsed {elapsed}  ETA {_fmt_s(eta)}  {memory()}")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(memory(), refresh=False)
            self.bar.update(n)
            return
        if self.every <= 0:
            return
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
