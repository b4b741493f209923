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
    def __init__(self, total: int, done: int = 0, every: float = 10.0, stream=None, tty=None):
        self.total, self.done, self.start_done = total, done, done
        self.stream = stream or sys.stderr
        self.every = every
        self.t0 = self.last = time.perf_counter()
        notebook = "ipykernel" in sys.modules and stream is None
        tty = (self.stream.isatty() or notebook) if tty is None else tty
        self.bar = None
        if tty:
            # a terminal's bar, or a notebook's widget (tqdm.auto picks); log files get lines
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=done, unit="cell", file=self.stream, smoothing=0.1,
                            dynamic_ncols=True)

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.done - self.start_done) / dt if dt > 0 else 0.0

    def line(self) -> str:
        r = self.rate()
        eta = (self.total - self.done) / r if r > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"cells {self.done}/{self.total} ({pct:.0f}%)  {r:.2f} cells/s  "
                f"elapsed {_fmt_s(time.perf_counter() - self.t0)}  ETA {_fmt_s(eta)}  {memory()}")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(memory(), refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
