"""The runner's message sequence, played in one process: each rank a thread, the communicator a
fake with the five calls the runner makes (probe, recv, send, bcast, abort), and a room whose
cells cost nothing. Every phase of the documented sequence and every failure phase, checked
by what each rank sent, what it received last, and how it ended. Beside the real-rank tests
(test_mpi.py, test_robustness.py), these run in well under a second each."""

import pickle
import threading
import time
from collections import defaultdict

import numpy as np

from lldist.errors import Stopped, UserError
from lldist.cells.schedule import Sweep
from lldist.transport import runner


class Aborted(BaseException):
    """MPI_Abort reached this rank."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


class World:
    def __init__(self, size):
        self.size = size
        self.lock = threading.Lock()
        self.boxes = defaultdict(list)  # (dest, tag) -> [(src, obj)]
        self.sent = []  # (src, dest, tag, obj)
        self.aborted = None
        self.bcast_value, self.bcast_ready = None, threading.Event()


class FakeLink:
    def __init__(self, world, rank):
        self.w, self.rank = world, rank

    def _check(self):
        if self.w.aborted is not None:
            raise Aborted(self.w.aborted)

    def probe(self, source, tag):
        self._check()
        with self.w.lock:
            for src, _ in self.w.boxes[(self.rank, tag)]:
                if source in (runner.ANY, src):
                    return src
        return None

    def recv(self, source, tag):
        with self.w.lock:
            box = self.w.boxes[(self.rank, tag)]
            for i, (src, obj) in enumerate(box):
                if src == source:
                    return box.pop(i)[1]
        raise AssertionError("recv without a message")

    def send(self, obj, dest, tag):
        self._check()
        obj = pickle.loads(pickle.dumps(obj))  # what MPI does to it
        with self.w.lock:
            self.w.sent.append((self.rank, dest, tag, obj))
            self.w.boxes[(dest, tag)].append((self.rank, obj))

    def bcast(self, obj, root=0):
        if self.rank == root:
            self.w.bcast_value = pickle.loads(pickle.dumps(obj))
            self.w.bcast_ready.set()
            return obj
        while not self.w.bcast_ready.wait(0.01):
            self._check()
        return self.w.bcast_value

    def abort(self, code):
        self.w.aborted = code
        raise Aborted(code)


class Room:
    """Doubles each cell's index; fails where told to."""

    cells_per_pass, rank0_computes, group_size = 2, True, 1

    def __init__(self, rank, ncells=40, chunk=3, fail=None):
        self.rank, self.ncells, self.chunk, self.fail = rank, ncells, chunk, fail or {}
        self.device = f"dev{rank}"
        self.results, self.closed, self.evaluated = [], None, 0

    def _maybe(self, phase, exc=RuntimeError):
        err = self.fail.get((self.rank, phase))
        if err is not None:
            raise err

    def prepare(self):
        self._maybe("prepare")
        self.schedule = Sweep(np.zeros(self.ncells, bool), self.chunk)
        return {"payload": 1}

    def build(self, payload, group=None):
        assert payload == {"payload": 1}
        self._maybe("build")
        return self.device

    def evaluate(self, cells):
        time.sleep(0.002 * len(cells))  # so that every rank is up before rank 0 has done everything
        self.evaluated += len(cells)
        if self.evaluated > 4:
            self._maybe("chunk")
        return np.asarray(cells, float)[:, None, None].repeat(2, axis=2) * 2

    def take_result(self, r):
        self.results.append(r)
        return len(r.cells)

    def tick(self):
        return 0

    def start(self, hosts):
        self.hosts = hosts

        class P:
            def update(self, n):
                pass

            def close(self):
                pass
        return P()

    def close(self, outcome, cost):
        self.closed = outcome


def play(size, fail=None, stop_after=None, ncells=40):
    """Run `size` ranks; returns (world, rooms, outcomes) with outcomes[rank] = ("return", code)
    or ("abort", code) or ("raise", exception)."""
    runner.ABORT_GRACE_S = 0.0
    runner.WORKER_NICE = 0  # the ranks are threads of this process: nice would lower the tests themselves
    world = World(size)
    rooms = [Room(r, ncells=ncells, fail=fail) for r in range(size)]
    outcomes = {}

    def should_stop():
        return 15 if stop_after is not None and len(rooms[0].results) >= stop_after else None

    def rank(r):
        ctx = runner.Context(rank=r, size=size, host=f"h{r}", link=FakeLink(world, r) if size > 1 else None)
        try:
            outcomes[r] = ("return", runner.run(ctx, rooms[r], should_stop if r == 0 else (lambda: None)))
        except Aborted as e:
            outcomes[r] = ("abort", e.code)
        except BaseException as e:  # noqa: B902 - the test wants whatever ended the rank
            outcomes[r] = ("raise", e)
    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(size)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(not t.is_alive() for t in threads), "a rank never ended"
    assert time.perf_counter() - t0 < 5
    return world, rooms, outcomes


def sent(world, src, dest=None, tag=None):
    return [obj for s, d, t, obj in world.sent if s == src and (dest is None or d == dest) and (tag is None or t == tag)]


def test_a_whole_run_follows_the_sequence():
    world, rooms, out = play(3)
    assert out == {0: ("return", 0), 1: ("return", 0), 2: ("return", 0)}
    results = rooms[0].results
    cells = np.concatenate([r.cells for r in results])
    assert sorted(cells.tolist()) == list(range(40))  # every cell once
    for r in results:  # the record made where it was computed, unchanged to the room
        np.testing.assert_array_equal(r.values[:, 0, 0], 2 * np.asarray(r.cells, float))
        assert r.device == f"dev{r.rank}" and r.host == f"h{r.rank}" and r.t_end >= r.t_start
    assert {r.rank for r in results} == {0, 1, 2}
    assert rooms[0].closed == "done" and rooms[0].hosts == {0: ("h0", "dev0"), 1: ("h1", "dev1"), 2: ("h2", "dev2")}
    for w in (1, 2):
        to_w = sent(world, 0, w)
        assert to_w[0] == ("payload",) and to_w[1] == ("go",)  # start-up, in order
        mine = sent(world, w, 0)
        assert mine[0][0] == "built" and mine[0][3] is None and mine[1] == ("ready", 2)
        asked = 2 + sum(1 for m in mine if m[0] == "result")
        answers = [m for m in to_w[2:] if m[0] in ("chunk", "stop")]
        assert len(answers) == asked  # one answer per chunk asked for
        # chunks, then "stop" for every request still open (a worker keeps two in flight)
        kinds = [m[0] for m in answers]
        first_stop = kinds.index("stop")
        assert set(kinds[first_stop:]) == {"stop"} and 1 <= len(kinds) - first_stop <= 2


def test_rank0_only_coordinates_beyond_its_limit(monkeypatch):
    """Beyond RANK0_COMPUTES_UP_TO ranks, rank 0 answers and writes, and computes nothing."""
    monkeypatch.setattr(runner, "RANK0_COMPUTES_UP_TO", 2)
    _, rooms, out = play(3)
    assert out == {0: ("return", 0), 1: ("return", 0), 2: ("return", 0)}
    assert {r.rank for r in rooms[0].results} == {1, 2} and rooms[0].evaluated == 0


def test_a_worker_failing_to_build_ends_every_rank():
    world, rooms, out = play(3, fail={(2, "build"): RuntimeError("no GPU here")})
    assert out == {0: ("return", 1), 1: ("return", 1), 2: ("return", 1)}
    assert rooms[0].closed == "failed" and not rooms[0].results
    assert all(m[0] != "chunk" for m in sent(world, 0))  # no work was handed out
    assert sent(world, 0, 1)[-1] == ("abort", 1)
    err = sent(world, 2, 0)[0][3]
    assert err[0] == 1 and "rank 2 on h2 failed in build: RuntimeError: no GPU here" in err[1]


def test_bad_input_at_build_is_status_2():
    _, _, out = play(2, fail={(1, "build"): UserError("data.root missing")})
    assert out == {0: ("return", 2), 1: ("return", 2)}


def test_a_worker_failing_in_a_chunk_aborts_the_job(capsys):
    world, rooms, out = play(3, fail={(1, "chunk"): ValueError("NaN weights")})
    assert out[0] == ("abort", 1) and {out[1], out[2]} <= {("abort", 1), ("return", 0)}
    assert rooms[0].closed == "failed"
    err = capsys.readouterr().err
    assert "rank 1 on h1 failed in chunk" in err and "ValueError: NaN weights" in err
    assert "--- traceback of rank 1 ---" in err
    errors = [m for m in sent(world, 1, 0) if m[0] == "error"]
    assert len(errors) == 1 and "ValueError: NaN weights" in errors[0][2]


def test_rank0_failing_to_prepare_aborts_the_workers_with_its_status(capsys):
    world, rooms, out = play(3, fail={(0, "prepare"): UserError("output is a folder")})
    assert out == {0: ("return", 2), 1: ("return", 2), 2: ("return", 2)}
    assert sent(world, 0, 1) == [("abort", 2)] and sent(world, 1) == []  # the workers never spoke
    assert capsys.readouterr().err.strip() == "lldist: error: output is a folder"


def test_sigterm_closes_the_file_and_ends_every_rank_with_143():
    world, rooms, out = play(3, stop_after=2, ncells=400)
    assert out[0] == ("abort", 143)
    assert rooms[0].closed == "stopped" and 2 <= len(rooms[0].results) < 400 // 3


def test_alone_a_cell_error_is_the_users_own_exception_naming_the_chunk():
    boom = ZeroDivisionError("my loss divided by zero")
    _, rooms, out = play(1, fail={(0, "chunk"): boom})
    kind, exc = out[0]
    assert kind == "raise" and exc is boom  # the very object, not SystemExit
    assert exc.__notes__ == ["lldist: rank 0 on h0 failed in chunk 1 (cells 3..5)"]
    assert rooms[0].closed == "failed"


def test_alone_ctrl_c_is_a_keyboard_interrupt_after_the_file_is_closed():
    _, rooms, out = play(1, fail={(0, "chunk"): KeyboardInterrupt()})
    assert out[0][0] == "raise" and isinstance(out[0][1], KeyboardInterrupt)
    assert rooms[0].closed == "stopped"


def test_alone_bad_input_in_prepare_raises_it():
    _, _, out = play(1, fail={(0, "prepare"): UserError("bad grid")})
    assert out[0][0] == "raise" and isinstance(out[0][1], UserError)


def test_alone_a_signal_raises_stopped():
    _, rooms, out = play(1, stop_after=1, ncells=100)
    assert out[0][0] == "raise" and isinstance(out[0][1], Stopped) and out[0][1].exit_code == 143
    assert rooms[0].closed == "stopped"
