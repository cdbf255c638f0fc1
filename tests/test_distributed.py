"""torchrun: two CPU processes (gloo backend) compute what one process computes, and a process that dies
stops the whole run, leaving the last finished round for --resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_model
import run
import tsalign
from conftest import argv, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")


def torchrun(args, nproc=2):
    """Start `torchrun --standalone --nproc_per_node nproc tsalign.py args` (a free port is chosen)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "tsalign.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pairs(out, r):
    with open(os.path.join(out, f"round_{r}", "pairs.jsonl")) as f:
        return [json.loads(line) for line in f]


# Blocks of 2 prompts: the round's 12 prompts and the 6 held-out ones are shared by both processes, while
# the one process samples in blocks of 5: a prompt's samples must not depend on the block it lands in.
# Batches of 3 pairs: one process takes 2 of them, the other 1 (and in a last batch of 1, none), so each
# process's loss must be weighted by its share. No warm-up: the student that ranks round 1's samples is then
# the very same in both runs. Always the CPU and gloo (two processes cannot share one GPU with nccl).
SMALL = ("--rounds", "1", "--sample-batch", "2", "--batch-size", "3", "--student-warmup", "0", "--device", "cpu")


def same_pairs(a, b):
    """The same pairs in the same order, margins equal to float32's precision (other blocks, other padding)."""
    strip = lambda ps: [{k: v for k, v in p.items() if k != "margin"} for p in ps]  # noqa: E731
    assert strip(a) == strip(b)
    assert all(abs(p["margin"] - q["margin"]) < 1e-5 for p, q in zip(a, b))


def test_two_processes_equal_one(world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    tsalign.main(argv(world, one, *SMALL, "--sample-batch", "5"))
    proc = torchrun(argv(world, two, *SMALL))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert log.count("run folder:") == 1 and "2 processes" in log  # only rank 0 prints
    # The pairs the two processes mined together are the single process's, in the same order.
    assert len(pairs(one, 1)) >= 3, "no batch of 3 pairs: nothing uneven is tested"
    same_pairs(pairs(two, 1), pairs(one, 1))
    a, b = metrics(one)[1], metrics(two)[1]
    for k in ("pairs_dropped", "teacher_calls", "truncation_rate", "teacher_overturn_rate"):
        assert a[k] == b[k], k
    assert metrics(one)[0]["win_rate_vs_base"] == metrics(two)[0]["win_rate_vs_base"] == 0.5
    # One data-parallel round of student and policy training gives the single process's weights.
    start = load_model(world["policy"], "cpu").state_dict()
    for name in ("policy", "student"):
        x = load_model(str(one / "round_1" / name), "cpu").state_dict()
        y = load_model(str(two / "round_1" / name), "cpu").state_dict()
        if name == "policy":
            assert max((x[k] - start[k]).abs().max() for k in x) > 1e-3, "the policy did not train: nothing compared"
        for k in x:
            assert (x[k] - y[k]).abs().max() < 1e-4, (name, k)


def children(pid):
    """The worker processes torchrun started: {rank: pid}, read from /proc (Linux)."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{p}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            out[int(env[b"RANK"])] = int(p)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return out


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has finished
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_a_dying_process_stops_the_run_and_the_last_round_survives(world, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(argv(world, out, "--rounds", "100", "--sample-batch", "4", "--student-warmup", "0", "--device", "cpu"))
    deadline = time.time() + 240
    while not os.path.exists(out / "round_1" / "metrics.json"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0] if proc.poll() is not None else "slow"
        time.sleep(0.05)
    ranks = children(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    log, _ = proc.communicate(timeout=120)  # no hang (TimeoutExpired otherwise): the other process is stopped too
    assert proc.returncode != 0
    assert "FAILED" in log and "SIGKILL" in log, log[-2000:]  # torchrun names the process and its signal
    assert all(gone(pid) for pid in ranks.values()), "a worker process outlived the run"
    # Every round folder is whole, and the run resumes from the last one in a single process.
    done = run.finished_rounds(str(out))
    assert done and done == list(range(max(done) + 1))
    tsalign.main(["--resume", "--out", str(out), "--rounds", str(max(done) + 1)])
    assert [m["round"] for m in metrics(out)] == list(range(max(done) + 2))


# ---- --fsdp: the policy and the student sharded across the processes (FSDP2) ---------------------

# 12 prompts in blocks of 5: three blocks, which two processes cannot share evenly; held-out: 6 in blocks of 5.
FSDP = ("--rounds", "1", "--sample-batch", "5", "--student-warmup", "0", "--device", "cpu")


def test_fsdp_round_equals_one_process(world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    tsalign.main(argv(world, one, *FSDP))
    proc = torchrun(argv(world, two, *FSDP, "--fsdp"))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert pairs(one, 1) and pairs(two, 1) == pairs(one, 1)
    for name in ("policy", "student"):
        x = load_model(str(one / "round_1" / name), "cpu").state_dict()
        y = load_model(str(two / "round_1" / name), "cpu").state_dict()
        for k in x:
            assert (x[k] - y[k]).abs().max() < 1e-4, (name, k)
    # Each process held about half of the weights and of the AdamW state it trained (measured from its shards).
    a, b = metrics(one)[1]["bytes_per_process"], metrics(two)[1]["bytes_per_process"]
    for key in ("policy_param", "policy_optimizer", "student_param", "student_optimizer"):
        assert 0.45 <= b[key] / a[key] <= 0.55, (key, a[key], b[key])
    # The saved round is an ordinary Hugging Face checkpoint: transformers reads the same logits.
    import transformers
    ours = load_model(str(two / "round_1" / "policy"), "cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(two / "round_1" / "policy", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_fsdp_run_survives_a_killed_process_and_resumes(world, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(argv(world, out, "--rounds", "100", "--sample-batch", "5", "--student-warmup", "0",
                         "--device", "cpu", "--fsdp"))
    deadline = time.time() + 240
    while not os.path.exists(out / "round_1" / "metrics.json"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0] if proc.poll() is not None else "slow"
        time.sleep(0.05)
    ranks = children(proc.pid)
    os.kill(ranks[1], signal.SIGKILL)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "SIGKILL" in log
    done = run.finished_rounds(str(out))
    resumed = torchrun(["--resume", "--out", str(out), "--rounds", str(max(done) + 1)])  # sharded again, 2 processes
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    assert [m["round"] for m in metrics(out)] == list(range(max(done) + 2))


SHARED_VS_PLAIN = """
import json, sys
sys.path.insert(0, {root!r})
import torch
import model
import parallel
import train_loop as TL
from checkpoint import load_model

TL.make_optimizer = lambda params, tc: torch.optim.SGD(params, lr=tc.lr)  # the update is the gradient itself
parallel.init_distributed("cpu", always=True)
pairs = [([1, 5, 6, 7], [8, 9, 2], [10, 11, 12, 2]), ([1, 6, 7], [9, 9, 4, 2], [9, 9, 3, 2]),
         ([1, 7, 7, 7, 7], [4, 2], [5, 5, 2]), ([1, 3], [13, 14, 15, 16, 2], [17, 18, 2])]
tc = TL.TrainConfig(lr=0.1, batch_size=4, warmup=0.0, progress=False)
out, shares = {{}}, TL.shares_prefix
for share in (True, False):
    TL.shares_prefix = shares if share else (lambda m: False)
    torch.manual_seed(0)  # the new head and the adapters: the same draws on both sides and in both processes
    lm, rm = load_model({policy!r}), model.add_reward_head(load_model({student!r}))
    model.add_lora(lm, 2)
    for lin in model.lora_layers(lm):
        for b in lin.lora_b:
            torch.nn.init.normal_(b, 0, 0.05)
    parallel.shard(lm), parallel.shard(rm)
    m = TL.train_dpo(lm, pairs, 0, tc, beta=0.5, sft_coef=0.3)
    TL.train_reward(rm, [(p + c, p + r) for p, c, r in pairs], 0, tc)
    full = lambda mod: {{k: v.full_tensor() for k, v in mod.state_dict().items()}}
    out[share] = (full(lm), full(rm), m["loss"])
diff = max((a[k] - b[k]).abs().max().item() for a, b in zip(out[True][:2], out[False][:2]) for k in a)
moved = max(b.abs().max().item() for k, b in out[True][0].items() if "lora_b" in k)
if parallel.is_main():
    json.dump({{"diff": diff, "loss": abs(out[True][2] - out[False][2]), "moved": moved}}, open({result!r}, "w"))
parallel.finish()
"""


def test_fsdp_training_with_shared_prompts_equals_unshared(world, tmp_path):
    """Under --fsdp (two processes), a DPO step (LoRA, an SFT term) and a student step with each pair's prompt
    computed once land on the weights of the unshared steps."""
    script, result = tmp_path / "shared.py", tmp_path / "result.json"
    script.write_text(SHARED_VS_PLAIN.format(root=ROOT, policy=world["policy"], student=world["student"], result=str(result)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(result.read_text())
    assert r["moved"] > 1e-3 and r["diff"] <= 1e-6 and r["loss"] <= 1e-6, r


ALONE = """
import sys
sys.path.insert(0, {root!r})
import torch
import parallel
import train_loop as TL

parallel.init_distributed("cpu")


def build():  # what --rebuild-world does on rank 0: a training loop, then work in blocks
    lin = torch.nn.Linear(2, 1)
    loss_fn = lambda net, idx: (net(torch.ones(len(idx), 2)).pow(2).mean(), {{}})
    TL.train(lin, 8, loss_fn, TL.TrainConfig(batch_size=2, progress=False))
    assert parallel.spread(lambda xs: [2 * x for x in xs], list(range(5)), block=2) == [0, 2, 4, 6, 8]


parallel.alone(build)
print(f"rank {{parallel.rank()}} of {{parallel.world_size()}} passed", flush=True)
parallel.finish()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_work_that_rank_0_does_alone_waits_for_no_one(tmp_path):
    """parallel.alone (--rebuild-world under torchrun): rank 0 trains and spreads work by itself, as
    one process does, while the other waits; then both go on together."""
    script = tmp_path / "alone.py"
    script.write_text(ALONE.format(root=ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        for pid in [*children(proc.pid).values(), proc.pid]:  # both workers (a hang), then torchrun
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("rank 0 waited for the other process inside parallel.alone")
    assert proc.returncode == 0, log[-3000:]
    assert "rank 0 of 2 passed" in log and "rank 1 of 2 passed" in log, log[-3000:]
