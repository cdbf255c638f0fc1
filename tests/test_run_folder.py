"""The run folder on a real machine: one run per folder, a full disk while saving, a damaged round on --resume,
and a Ctrl-C at any moment. Each ends in one line that names the file or folder, and loses nothing saved."""
import datetime
import errno
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch
from safetensors import SafetensorError

import checkpoint
import config
import parallel
import report
import run
import runlock
import train_loop
import tsalign
from conftest import argv, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, flock, fork")


def without_seconds(rows):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in rows]


def tree(folder):
    """Every file under folder (the lock file aside) with its size and modification time."""
    return {os.path.relpath(os.path.join(d, f), folder): (os.path.getsize(os.path.join(d, f)),
                                                         os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(folder) for f in files if f != ".lock"}


def last_line(text):
    return text.strip().splitlines()[-1]


def enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' words, on a tmpfs


# ---- 1. One run per folder -----------------------------------------------------------------------

@linux
def test_a_folder_in_use_is_refused_and_freed_when_its_run_dies(world, tmp_path, capsys):
    out = tmp_path / "run"
    tsalign.main(argv(world, out, "--rounds", "1"))
    capsys.readouterr()
    # Another process holds the folder, as a running run does.
    holder = subprocess.Popen([sys.executable, "-c", "import runlock, sys, time; runlock.lock(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    before = tree(out)
    host = os.uname().nodename
    for args in (argv(world, out, "--rounds", "1"), ["--resume", "--out", str(out), "--rounds", "2"]):
        with pytest.raises(SystemExit) as e:
            tsalign.main(args)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip() == (f"tsalign: error: {out} is in use by another run (pid {holder.pid} on "
                                                   f"{host}); wait for it to end, or choose another --out")
    assert tree(out) == before  # nothing in the folder was read into a run, or written
    holder.kill()  # the operating system lets go of the lock of a killed process
    holder.wait()
    tsalign.main(["--resume", "--out", str(out), "--rounds", "2"])
    assert [m["round"] for m in metrics(out)] == [0, 1, 2]


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_locks_is_named_and_the_run_goes_on(world, tmp_path, capsys, monkeypatch, code):
    def no_locks(f, how):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    out = str(tmp_path / "run")
    try:
        args = run.start(*config.parse_args(argv(world, out, "--rounds", "1")))
    finally:
        runlock.unlock()
    assert args.out == out
    assert capsys.readouterr().err.strip() == (f"tsalign: warning: {out}/.lock: this file system does not support "
                                               f"locks ({os.strerror(code)}); nothing keeps a second run out of {out}")


def test_runs_started_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2025, 1, 2, 3, 4, 5)
    monkeypatch.setattr(runlock.datetime, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    a, b, c = (runlock.new_folder(None) for _ in range(3))
    assert len({a, b, c}) == 3 and all(os.path.isdir(x) for x in (a, b, c))
    assert sorted([c, a, b]) == [a, b, c]  # the newest sorts last: --resume without --out takes it


# ---- 2. A full disk while saving -----------------------------------------------------------------

def test_a_full_disk_stops_the_run_in_one_line_and_resume_completes_it(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    # After round_1 is in place, report.html cannot be rewritten: half of it is written, then the disk is full.
    real_write = report.write

    def report_on_a_full_disk(path, text):
        if not os.path.exists(out / "round_1"):
            return real_write(path, text)
        with open(path + ".tmp", "w") as f:
            f.write(text[:100])
        raise enospc(path + ".tmp")
    monkeypatch.setattr(report, "write", report_on_a_full_disk)
    with pytest.raises(SystemExit) as e:
        tsalign.main(argv(world, out, "--rounds", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert last_line(err) == (f"tsalign: error: round 1 is saved in {out}, but metrics.jsonl or report.html could not be "
                              f"rewritten (No space left on device: {out}/report.html.tmp); free space, then --resume "
                              f"rebuilds them: python tsalign.py --resume --out {out}")
    assert run.finished_rounds(str(out)) == [0, 1] and not os.path.exists(out / "report.html.tmp")
    monkeypatch.undo()
    tsalign.main(["--resume", "--out", str(out), "--rounds", "1"])  # no round to run: the summaries are rebuilt
    assert (out / "report.html").read_text() == report.page([report.read_run(str(out))])
    assert [m["round"] for m in metrics(out)] == [0, 1]
    capsys.readouterr()

    # Round 2's policy weights meet a full disk, part of the file written (safetensors' own error, as on a tmpfs).
    real_save = checkpoint.save_file

    def save_on_a_full_disk(tensors, filename, **kw):
        if f".round_2.tmp{os.sep}policy" in filename:
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)
            raise SafetensorError(FULL)
        return real_save(tensors, filename, **kw)
    monkeypatch.setattr(checkpoint, "save_file", save_on_a_full_disk)
    rounds_before, rows_before = {k: v for k, v in tree(out).items() if k.startswith("round_")}, metrics(out)
    with pytest.raises(SystemExit) as e:
        tsalign.main(["--resume", "--out", str(out), "--rounds", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    size = sum(v[0] for k, v in tree(out).items() if k.startswith("round_1"))
    assert last_line(err) == (f"tsalign: error: round 2 was not saved (No space left on device: {out}/.round_2.tmp/policy/"
                              f"model.safetensors); rounds 0-1 are saved in {out} (round 1 took {size / 1e6:.1f} MB); "
                              f"free space, then continue with: python tsalign.py --resume --out {out}")
    assert not os.path.exists(out / ".round_2.tmp")  # the partial round, and the space it took, are gone
    assert {k: v for k, v in tree(out).items() if k.startswith("round_")} == rounds_before  # nothing saved is touched
    assert metrics(out) == rows_before
    monkeypatch.undo()  # space is freed
    tsalign.main(["--resume", "--out", str(out), "--rounds", "2"])
    assert [m["round"] for m in metrics(out)] == [0, 1, 2]


def test_a_full_disk_before_the_first_round_says_so_and_the_same_command_runs_again(world, tmp_path, capsys,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    real_write_json = run.write_json

    def full_disk(path, obj, lines=False):
        if path.endswith("config.json"):
            with open(path + ".tmp", "w") as f:
                f.write("{")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a failed write() names no file
        return real_write_json(path, obj, lines)
    monkeypatch.setattr(run, "write_json", full_disk)
    with pytest.raises(SystemExit) as e:
        tsalign.main(argv(world, out, "--rounds", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.strip() == (f"tsalign: error: {out}/config.json could not be written (No space "
                                                 f"left on device); free space, then run the same command again")
    assert sorted(os.listdir(out)) == [".lock"]
    monkeypatch.undo()
    tsalign.main(argv(world, out, "--rounds", "1"))
    assert [m["round"] for m in metrics(out)] == [0, 1]


@linux
def test_a_weight_file_that_cannot_be_written_is_an_oserror_naming_it(tmp_path):
    """safetensors says only SafetensorError("... I/O error: ... (os error N)"); write_weights raises the OSError,
    naming the file. A file size limit (RLIMIT_FSIZE) makes the real write fail, as a full disk does."""
    import resource
    file = str(tmp_path / "model.safetensors")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # Python ignores SIGXFSZ: the write gets EFBIG
    try:
        with pytest.raises(OSError) as e:
            checkpoint.write_weights({"w": torch.zeros(10000)}, file)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert e.value.errno == errno.EFBIG and e.value.filename == file


# ---- 3. --resume checks the folder before it loads anything -------------------------------------

@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished two-round run: the folder every damage below is made to (in a copy)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    tsalign.main(argv(world, out, "--rounds", "2"))
    return out


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def break_last_line(path):
    with open(path, "a") as f:
        f.write('{"prompt": "cut sh')


DAMAGES = [  # (file, damage, its round, what the line says of it)
    ("round_2/policy/model.safetensors", truncate, 2, "round_2/policy is damaged (weight file {f} is truncated or corrupt"),
    ("round_2/student/config.json", os.remove, 2, "round_2/student is damaged (no config.json in"),
    ("round_2/examples.json", truncate, 2, "{f} is damaged (Expecting"),
    ("round_1/pairs.jsonl", break_last_line, 1, "{f} is damaged (Unterminated string"),
    ("round_1/metrics.json", os.remove, 1, "{f} is missing"),
    ("round_0/base_eval.json", truncate, 0, "{f} is damaged ("),
    ("round_0/metrics.json", truncate, 0, "{f} is damaged ("),
]


@pytest.mark.parametrize("name, damage, r, says", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_resume_names_a_damaged_file_and_how_to_redo_its_round(finished, tmp_path, capsys, monkeypatch, name, damage,
                                                              r, says):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    damage(out / name)
    before = tree(out)
    monkeypatch.setattr(run, "set_up", lambda *a, **kw: pytest.fail("models were loaded before the folder was checked"))
    with pytest.raises(SystemExit) as e:
        tsalign.main(["--resume", "--out", str(out), "--rounds", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    later = " and every later round folder (to round_2)" if r < 2 else ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("tsalign: error: --resume: " + os.path.join(str(out), says.format(f=out / name))), err
    assert err.endswith(f"; to redo round {r}, move round_{r}{later} out of {out}, then resume: "
                        f"{'they are' if later else 'it is'} recomputed from {f'round {r - 1}' if r else 'the start'}"), err
    assert tree(out) == before  # nothing moved, deleted or written


def test_a_damaged_round_moved_aside_is_recomputed_as_it_was(finished, tmp_path):
    out, aside = tmp_path / "run", tmp_path / "aside"
    shutil.copytree(finished, out)
    break_last_line(out / "round_1" / "pairs.jsonl")
    aside.mkdir()
    for r in (1, 2):  # as the line says: that round and every later one
        shutil.move(out / f"round_{r}", aside / f"round_{r}")
    tsalign.main(["--resume", "--out", str(out), "--rounds", "2"])
    assert without_seconds(metrics(out)) == without_seconds(metrics(finished))
    assert (out / "round_2" / "pairs.jsonl").read_text() == (finished / "round_2" / "pairs.jsonl").read_text()


# ---- 4. Ctrl-C and SIGTERM at any moment ---------------------------------------------------------

def test_a_signal_waits_for_a_safe_point_and_a_second_one_a_second_later_stops_at_once(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(parallel.time, "monotonic", lambda: now[0])
    with parallel.stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)  # recorded; nothing is raised where it lands
        assert parallel.stop_signal == signal.SIGINT
        now[0] += 0.5
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, delivered again (a terminal, then torchrun)
        with pytest.raises(parallel.Stopped) as e:
            parallel.safe_point()
        assert e.value.signum == signal.SIGINT
        now[0] += 1
        with pytest.raises(parallel.Stopped) as e:
            os.kill(os.getpid(), signal.SIGTERM)  # a second one, later: at once
            time.sleep(1)
        assert e.value.signum == signal.SIGTERM
    assert parallel.stop_signal is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sampling_and_training_stop_within_one_block_or_step():
    calls = []

    def block(xs):  # the signal comes while the second block runs
        calls.append(xs)
        if len(calls) == 2:
            parallel.stop_signal = signal.SIGTERM
        return xs
    with parallel.stop_on_signals(), pytest.raises(parallel.Stopped) as e:
        parallel.spread(block, list(range(10)), block=2)
    assert len(calls) == 2 and e.value.signum == signal.SIGTERM

    lin, steps = torch.nn.Linear(2, 1), []

    def loss_fn(net, idx):
        steps.append(idx)
        if len(steps) == 3:
            parallel.stop_signal = signal.SIGINT
        return net(torch.ones(len(idx), 2)).pow(2).mean(), {}
    with parallel.stop_on_signals(), pytest.raises(parallel.Stopped):
        train_loop.train(lin, 40, loss_fn, train_loop.TrainConfig(batch_size=2, progress=False))
    assert len(steps) == 3


def fork_main(args, log, pause=None):
    """Run tsalign.main(args) in a child of this process as `python tsalign.py ARGS` runs (stdout and stderr into
    the file log; an uncaught exception prints its traceback and exits 1) and return its pid. A fork, not a new
    python: this process has imported torch already, which takes a new one seconds. The child writes the time
    it passed the run's last safe point into log.end. pause: (owner, name, marker, when): the first call of
    owner.name for which when(*args) holds creates the file marker, then waits half a second, in the child."""
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
        finish = parallel.finish  # called just after the last safe point

        def end():
            with open(f"{log}.end", "w") as f:
                f.write(repr(time.time()))
            finish()
        parallel.finish = end
        if pause:
            owner, name, marker, when = pause
            real = getattr(owner, name)

            def paused(*a, **kw):
                if not os.path.exists(marker) and when(*a):
                    open(marker, "w").close()
                    time.sleep(0.5)
                return real(*a, **kw)
            setattr(owner, name, paused)
        tsalign.main(args)
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(status)


def wait_for(pid, ready):
    deadline = time.time() + 60
    while not ready():
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the run ended before the moment came"
        assert time.time() < deadline
        time.sleep(0.001)


@linux
def test_a_ctrl_c_at_any_moment_stops_the_run_in_one_line_and_resume_completes_it(world, tmp_path):
    """SIGINT at 20 moments spread over a two-round run (from its "run folder:" line to its last safe point),
    and at three chosen ones: while the last round's checkpoint is written (after its last training step and
    block of sampling), while the held-out evaluation runs, and inside a progress bar's finalizer (where an
    exception raised by a signal is dropped). Each run stops with status 130 and the one line; each resume
    then ends where an uninterrupted run ends."""
    from tqdm import tqdm
    tqdm.monitor_interval = 0  # no monitor thread: this process forks
    if tqdm.monitor is not None:
        tqdm.monitor.exit()
        tqdm.monitor = None
    args = lambda out: argv(world, out, "--rounds", "2", "--prompts-per-round", "4", "--eval-count", "3",  # noqa: E731
                            "--k", "3", "--max-new-tokens", "10", "--device", "cpu")
    started = lambda log: lambda: os.path.exists(log) and "run folder:" in log.read_text()  # noqa: E731
    full, log = tmp_path / "full", tmp_path / "full.log"
    pid = fork_main(args(full), log)
    wait_for(pid, started(log))
    t0 = time.time()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, log.read_text()
    span = float(open(f"{log}.end").read()) - t0
    marker = str(tmp_path / "paused")
    moments = [(span * (i + 0.5) / 20, lambda out: None) for i in range(20)] + [
        (0.05, lambda out: (checkpoint, "save_file", marker, lambda tensors, file: ".round_2.tmp" in file)),
        (0.05, lambda out: (tsalign.evaluate, "held_out_metrics", marker, lambda *a: True)),
        # a bar of this process's earlier tests may be collected before the run starts: not that one
        (0.05, lambda out: (tqdm, "__del__", marker, lambda *a: os.path.exists(out / "config.json")))]

    def check_resumed(i, out, pid):
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, (i, open(f"{out}.log.resume").read()[-3000:])
        assert without_seconds(metrics(out)) == without_seconds(metrics(full)), i

    resuming = None
    for i, (delay, pause) in enumerate(moments):
        for attempt in range(5):  # a busy machine may run a later moment past the run's end: then a little sooner
            out, log = tmp_path / f"run{i}-{attempt}", tmp_path / f"run{i}-{attempt}.log"
            if os.path.exists(marker):
                os.remove(marker)
            pid = fork_main(args(out), log, pause(out))
            wait_for(pid, started(log) if pause(out) is None else lambda: os.path.exists(marker))
            time.sleep(delay * 0.7 ** attempt)
            sent = time.time()
            os.kill(pid, signal.SIGINT)
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if not (status == 0 and os.path.exists(f"{log}.end") and float(open(f"{log}.end").read()) < sent):
                break
        text = log.read_text()
        assert status == 130 and "Traceback" not in text and "Exception ignored" not in text, (i, status, text[-3000:])
        done = run.finished_rounds(str(out))
        saved = f"rounds 0-{max(done)} are saved" if len(done) > 1 else "round 0 is saved" if done else \
            "no round is finished yet"
        assert last_line(text) == (f"tsalign: stopped by Ctrl-C; {saved} in {out}; continue with: python tsalign.py "
                                   f"--resume --out {out}"), (i, text[-2000:])
        if resuming:  # one resume at a time runs beside the next stopped run (a fork, as the runs are)
            check_resumed(*resuming)
        resuming = (i, out, fork_main(["--resume", "--out", str(out), "--rounds", "2"], f"{log}.resume"))
    check_resumed(*resuming)


# ---- Under torchrun: every process stops at the same point, with process 0's one line ------------

def torchrun(args, logs, env=None):
    """`torchrun --standalone --nproc_per_node 2 tsalign.py args`, each worker's stdout and stderr in files
    under logs (worker_log(logs, rank))."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log-dir",
           str(logs), "--redirects", "3", os.path.join(ROOT, "tsalign.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_log(logs, rank, stream="stderr"):
    files = glob.glob(os.path.join(logs, "**", str(rank), f"{stream}.log"), recursive=True)
    assert len(files) == 1, files
    with open(files[0]) as f:
        return f.read()


# Loaded by every worker of the test below (PYTHONPATH): process 0 meets a full disk as it writes the first
# weight file of round 1's policy, which --fsdp gathers from both processes as it is written, file by file.
FULL_DISK = f"""
import os
if os.environ.get("RANK") == "0":
    import safetensors, safetensors.torch as st
    real = st.save_file
    def save_file(tensors, filename, **kw):
        if ".round_1.tmp" + os.sep + "policy" in filename:
            raise safetensors.SafetensorError({FULL!r})
        return real(tensors, filename, **kw)
    st.save_file = save_file
"""


@linux
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_under_torchrun_a_full_disk_on_process_0_stops_every_process_with_its_line(world, tmp_path):
    out, logs, site = tmp_path / "run", tmp_path / "logs", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK)
    proc = torchrun(argv(world, out, "--rounds", "1", "--sample-batch", "5", "--student-warmup", "0", "--device", "cpu",
                         "--fsdp", "--max-shard-size", "0.00002"), logs, {"PYTHONPATH": str(site)})  # 20 kB files
    log, _ = proc.communicate(timeout=240)  # not the collective timeout (30 minutes)
    assert proc.returncode != 0
    err0, err1 = worker_log(logs, 0), worker_log(logs, 1)
    assert "Traceback" not in err0 + err1, (err0[-3000:], err1[-3000:])
    size = sum(v[0] for k, v in tree(out).items() if k.startswith("round_0"))
    assert re.fullmatch(re.escape(f"tsalign: error: round 1 was not saved (No space left on device: {out}/.round_1.tmp/"
                                  f"policy/model-00001-of-") + r"\d{5}" + re.escape(
                        f".safetensors); round 0 is saved in {out} (round 0 took {size / 1e6:.1f} MB); free space, then "
                        f"continue with: torchrun ... tsalign.py --resume --out {out}"), last_line(err0)), err0[-2000:]
    assert "tsalign:" not in err1 and "Error" not in err1, err1[-3000:]  # process 1 stopped too, without a word
    assert not os.path.exists(out / ".round_1.tmp") and run.finished_rounds(str(out)) == [0]


@linux
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_under_torchrun_a_ctrl_c_to_one_process_stops_both_at_the_same_point(world, tmp_path, capsys):
    from test_distributed import children
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = torchrun(argv(world, out, "--rounds", "3", "--sample-batch", "2", "--student-warmup", "0", "--device", "cpu"),
                    logs)
    deadline = time.time() + 240
    while not os.path.exists(out / "round_0" / "metrics.json"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.01)
    ranks = children(proc.pid)
    with pytest.raises(SystemExit):  # process 0 holds the folder
        tsalign.main(["--resume", "--out", str(out), "--rounds", "3"])
    assert f"{out} is in use by another run (pid {ranks[0]} on " in capsys.readouterr().err
    os.kill(ranks[1], signal.SIGINT)  # process 0 gets no signal: it must learn of it at the next safe point
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    err0, err1 = worker_log(logs, 0), worker_log(logs, 1)
    assert "Traceback" not in err0 + err1, (err0[-3000:], err1[-3000:])
    done = run.finished_rounds(str(out))
    saved = f"rounds 0-{max(done)} are saved" if len(done) > 1 else "round 0 is saved"
    assert last_line(err0) == (f"tsalign: stopped by Ctrl-C; {saved} in {out}; continue with: torchrun ... tsalign.py "
                               f"--resume --out {out}")
    # Both processes stopped at the safe point: process 0's line above says so. Which of them torchrun sees
    # exit first is a race: the first to exit 130 makes torchrun send SIGTERM to the other, which may still
    # be closing (process 0 writes the line and lets go of the folder), so only one exit code is certain.
    assert log.count("exitcode  : 130") >= 1, log[-3000:]
    tsalign.main(["--resume", "--out", str(out), "--rounds", str(max(done) + 1)])
    assert [m["round"] for m in metrics(out)] == list(range(max(done) + 2))
