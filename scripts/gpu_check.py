"""CUDA checks, run by hand on a machine with a GPU (not collected by pytest; CPU CI cannot run them):

    python scripts/gpu_check.py

Our model against transformers on the GPU in float32 and bfloat16, greedy sampling on the GPU against our
own uncached forward, and one TS-Align round on tiny checkpoints with --device cuda."""
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root
TESTS = os.path.join(ROOT, "tests")
sys.path.insert(0, ROOT)
sys.path.insert(0, TESTS)  # the tests' tiny checkpoints and references (conftest.py)
from checkpoint import load_model  # noqa: E402
from generate import generate  # noqa: E402
from conftest import FAMILIES, hf_load, make_checkpoint, uncached_greedy  # noqa: E402


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    return ok


def main():
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(), torch.__version__)
    good = True
    root = tempfile.mkdtemp()
    g = torch.Generator().manual_seed(0)
    for fam in FAMILIES:
        for reward in (False, True):
            if reward and fam not in ("llama", "qwen2", "gpt2"):
                continue
            d = make_checkpoint(os.path.join(root, f"{fam}{int(reward)}"), fam, reward=reward)
            ids = torch.randint(3, 128, (3, 24), generator=g).cuda()
            for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.15)):
                ours = load_model(d, device="cuda", dtype=dtype)
                theirs = hf_load(d, reward).to("cuda", dtype)
                with torch.no_grad():
                    a = ours(ids).float()
                    b = theirs(ids).logits.float()
                    b = b[:, 0] if reward else b
                err = (a - b).abs().max().item()
                good &= check(f"{fam}{' reward' if reward else ''} {dtype}", err <= tol, f"max |diff| {err:.2e}")
    # Greedy on the GPU equals step-by-step argmax without a cache (float32).
    lm = load_model(make_checkpoint(os.path.join(root, "gen"), "llama"), device="cuda")
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 17, 9)]
    out = generate(lm, prompts, 12)
    same = all(uncached_greedy(lm, p, 12)[0] == o for p, o in zip(prompts, out))
    good &= check("greedy generate == uncached argmax on cuda", same)
    k = generate(lm, prompts, 12, temperature=1.0, top_p=0.9, num_samples=4,
                       generator=torch.Generator(device="cuda").manual_seed(1))
    good &= check("num_samples=4 sampling on cuda", len(k) == 12 and all(len(x) == 12 for x in k))
    # One TS-Align round on tiny checkpoints, on the GPU.
    import pytest
    os.environ["TSALIGN_TEST_DEVICE"] = "cuda"
    test_file = os.path.join(TESTS, "test_tsalign.py")
    rc = pytest.main(["-q", "-x", test_file, "-k", "two_rounds or variants"])
    good &= check("tests/test_tsalign.py (two rounds, variants) with --device cuda", rc == 0)
    print("ALL OK" if good else "SOME CHECKS FAILED")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
