"""The output file of a run, handled once: its path checked, its lock taken, what it holds read
once, and the decision to resume it, make it anew or refuse it.

    out = Output(path)                          # UserError: not writable, a folder, locked
    out.refuse_foreign(config_hash, overwrite)  # before any work (training included)
    sf = out.open(job, hashes, grid, make_dirs, meta, overwrite, quantities)   # the writer
    out.release()                               # when the run ends, however it ends
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Optional

import h5py

from ..cells.grid import Grid
from ..config import Job, differences
from ..directions.record import Directions
from ..errors import UserError
from .layout import DEFAULT_QUANTITIES, FORMAT_VERSION, RESUMABLE, now_iso
from .reader import SurfaceReader
from .writer import SurfaceWriter

def check_writable(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise UserError(f"output {path}: cannot create folder {d}: {e.strerror}")
    if not os.access(d, os.W_OK):
        raise UserError(f"output {path}: folder {d} is not writable")
    if os.path.isdir(path):
        raise UserError(f"output {path} is a folder, not a file")


class Lock:
    """One run per output file: an exclusive flock on `<output>.lock`, held by rank 0 from before
    training to the end. A second run on the same output is refused at once; the lock goes
    with the process, so a killed run never leaves a stale one."""

    def __init__(self, path: str):
        import fcntl
        self.path = path + ".lock"
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"output {path}: cannot create its lock file {self.path} ({e.strerror})")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                holder = ""
                try:
                    with open(self.path) as f:
                        holder = f.read().strip()
                except OSError:
                    pass
                raise UserError(f"output {path} is being written by another run ({holder or 'running'}); "
                                "wait for it to end, or use --out for another file")
            # the holder before us may have removed the file between our open and our lock:
            # the lock is ours only if the path still names the file we locked
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        # who holds it, for the refusal message; on a full disk the lock holds without it (the
        # flock is the lock, not the text), so a half-done surface still resumes there
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}\n".encode())
        except OSError:
            pass

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.remove(self.path)  # before unlocking: a waiting run re-checks the path
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def all_closed() -> bool:
    """No HDF5 file of this process is open (a command may then skip the interpreter's teardown)."""
    return len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)) == 0


class Output:
    """The output file of a run, handled once: the path checked, the lock taken, and what the
    path already holds read once, read-only (a refused run leaves it exactly as it was,
    modification time included).

        out = Output(path)                          # UserError: not writable, a folder, locked
        out.refuse_foreign(config_hash, overwrite)  # before any work (training included)
        sf = out.open(job, hashes, grid, make_dirs, meta, overwrite, quantities)   # the writer
        out.release()                               # when the run ends, however it ends
    """

    def __init__(self, path: str):
        self.path = path
        check_writable(path)
        self.lock = Lock(path)
        try:
            self.existing = self._read_existing()
        except BaseException:
            self.lock.release()
            raise

    def _read_existing(self) -> Optional[dict]:
        """What identifies the surface at the path: None for no file; {"foreign": why} for a
        file that is not an lldist surface."""
        if not os.path.exists(self.path):
            return None
        try:
            with SurfaceReader(self.path) as sf:
                return {"config": sf.attr("job_config_hash", ""), "job": sf.attr("job_hash", ""),
                        "version": sf.version, "source": sf.attr("job_source", "?"), "text": sf.job_yaml()}
        except UserError as e:
            return {"foreign": str(e)}

    def refuse_foreign(self, config_hash: str, overwrite: bool, job_text: str = "") -> None:
        """Refuse an output this job may not write. Anything that is not an lldist surface is
        never touched, --overwrite or not (it may be the job's own checkpoint or job file given
        as --out). Without --overwrite, a surface made by another job configuration, or by an
        older format, is refused too."""
        e = self.existing
        if e is None:
            return
        if "foreign" in e:
            raise UserError(f"{e['foreign']}; refusing to replace a file that is not an lldist surface")
        if overwrite:
            return
        if e["version"] not in RESUMABLE:
            why = ("random directions now come from a stream of their own, so its cells cannot be mixed "
                   "with new ones") if e["version"] < 2 else "its work log has the older layout" \
                if e["version"] < 3 else "its cells lack the loss's standard error, loss_se"
            raise UserError(f"output {self.path} has format version {e['version']}, this lldist writes "
                            f"{FORMAT_VERSION} ({why}); use --out for a new file or --overwrite to replace it")
        if e["config"] and e["config"] != config_hash:
            changed = differences(e["text"], job_text) if job_text else []
            raise UserError(f"output {self.path} was made by a different job ({e['source']}"
                            + (f"; {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}" if changed else "")
                            + "); use --out for a new file or --overwrite to replace it")

    def open(self, job: Job, hashes: dict, grid: Grid, make_dirs: Callable[[], Directions], meta: dict,
             overwrite: bool = False, quantities: Optional[dict] = None,
             check: Callable[[SurfaceReader], None] = lambda sf: None) -> "SurfaceWriter":
        """Resume the file this job made, or make a new one. A file to resume is first read and
        `check`ed read-only (what it holds must be what this run computes: a refusal leaves it
        as it was, its run count included). A new file (also with --overwrite) is written beside
        the old under a temporary name and renamed over it only once it is complete: a run that
        fails before then leaves the old file as it was."""
        self.refuse_foreign(hashes["config"], overwrite, job.text)
        e = self.existing
        if e is not None and not overwrite:
            if e["job"] != hashes["job"]:
                raise UserError(f"output {self.path} was made by a different job ({e['source']}, hash "
                                f"{e['job'][:12]}; this job's is {hashes['job'][:12]}: another checkpoint, target, "
                                "data or loss); use --out for a new file or --overwrite to replace it")
            with SurfaceReader(self.path) as sf:
                check(sf)
            return SurfaceWriter.begin(self.path)
        return SurfaceWriter.create(self.path, job, hashes, grid, make_dirs(), meta, quantities or DEFAULT_QUANTITIES)

    def release(self) -> None:
        self.lock.release()
