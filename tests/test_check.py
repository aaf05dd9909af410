"""``python -m iscse.check``: the real ``--quick`` verification in a subprocess (every backend available on the CPU,
the Triton one in the interpreter at tiny shapes), a deliberately wrong backend failing it, timing records, and
one-line argument errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iscse import check as C
from iscse.backends import available_backends, get_backend

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the checks' small tensors are far faster that way on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_verifies_every_available_backend(tmp_path):
    """``--quick --no-timing`` (the quick mode's verification, without its timings): exit status 0, every backend
    that ``available_backends("cpu")`` lists verified with no failure, each op and (for Triton) both ways of the
    fused step, and the table on stdout."""
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
               OMP_NUM_THREADS="1")  # 2-core CI: one thread is faster than two contending with pytest
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "iscse.check", "--quick", "--no-timing", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    expected = sorted(n for n, ok in available_backends(CPU).items() if ok)
    assert {"reference", "torch"} <= set(expected)
    assert sorted({r["backend"] for r in doc["checks"]}) == expected
    assert doc["passed"] and doc["summary"]["failed"] == 0 and doc["timings"] is None
    for name in expected:
        recs = [r for r in doc["checks"] if r["backend"] == name]
        assert doc["backends"][name] == f"verified: {len(recs)} checks, 0 failed"
        ops = {r["op"] for r in recs}
        assert ops == ({"knn_topk", "step"} if get_backend(name, CPU).knn_only
                       else {"knn_topk", "smooth", "info_nce", "step"}), (name, ops)
        steps = [r for r in recs if r["op"] == "step"]
        assert {r["dtype"] for r in steps} == {"fp32", "bf16"}
        assert {r["aggregation"] for r in steps} == {"attention", "mean"}
        assert any(r["shape"][0] == 1 for r in steps) and any(r["shape"][3] == 1 for r in steps)
        if name == "triton":
            assert {r["mode"] for r in steps} == {"held", "made in forward"}
            assert all(max(r["shape"]) <= 20 for r in recs), "interpreter shapes must be tiny"
        for r in recs:
            assert r["passed"] and r["exception"] is None
            assert r["errors"] and all(0 <= err <= tol for err, tol in r["errors"].values()), r
    table = proc.stdout
    assert "== environment" in table and "== verification" in table and "PASSED" in table
    assert "CPU flags: " in table and "AVX-512-BF16" in table
    rows = [line for line in table.splitlines() if line.endswith("  ok")]
    assert len(rows) == len(doc["checks"])
    for name in expected:
        assert f"[iscse.check] verified {name}:" in proc.stderr


def test_wrong_backend_fails(tmp_path, monkeypatch, capsys):
    """A torch backend whose InfoNCE is 0.1% off fails the check (exit status 1): the fp32 InfoNCE and step
    checks, not the kNN or the aggregation; the table says FAIL and what to do."""
    from iscse.backends import pytorch

    right = pytorch.TorchBackend.info_nce
    monkeypatch.setattr(pytorch.TorchBackend, "info_nce", lambda self, a, b, t: right(self, a, b, t) * 1.001)
    out = tmp_path / "check.json"
    assert C.main(["--quick", "--no-timing", "--device", "cpu", "--backends", "torch", "--json", str(out)]) == 1
    doc = json.loads(out.read_text())
    failed = {(r["op"], r["dtype"]) for r in doc["checks"] if not r["passed"]}
    assert ("info_nce", "fp32") in failed and ("step", "fp32") in failed
    assert not any(op in ("knn_topk", "smooth") for op, _ in failed)
    worst = next(r for r in doc["checks"] if r["op"] == "info_nce" and r["dtype"] == "fp32" and r["shape"][0] > 1)
    assert worst["errors"]["loss"][0] == pytest.approx(1e-3, rel=1e-2)
    assert not doc["passed"] and doc["summary"]["failed_backends"] == ["torch"]
    text = capsys.readouterr().out
    assert "FAIL" in text and "please report it" in text


def test_exception_in_a_backend_is_a_failure(monkeypatch):
    """A check that raises is recorded as failed with the exception, and the others still run."""
    from iscse.backends import pytorch

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pytorch.TorchBackend, "smooth", broken)
    monkeypatch.setattr(C, "QUICK_SHAPES", [(3, 10, 13, 2)])
    recs = C.verify_backend("torch", CPU, quick=True)
    smooth = [r for r in recs if r["op"] == "smooth"]
    assert smooth and all(not r["passed"] and "RuntimeError: boom" in r["exception"] for r in smooth)
    assert all(r["passed"] for r in recs if r["op"] in ("knn_topk", "info_nce"))


def test_time_backends_records():
    """Interleaved timing at a tiny shape: one record per implementation, the reference's ratio 1, no floor on
    CPU."""
    recs = C.time_backends(["torch"], CPU, (4, 40, 16, 3), "fp32", rounds=2)
    assert [r["impl"] for r in recs] == ["reference", "torch"]
    assert all(len(r["times_ms"]) == 2 and r["median_ms"] > 0 for r in recs)
    assert recs[0]["ratio_to_reference"] == 1.0 and "floor_ms" not in recs[1]


def test_roofline_floor():
    """The floor at the paper's shape from given rates, each mode the larger of its bytes and FLOPs terms (both
    bandwidth-bound here); gpu_bench uses the same function."""
    from iscse._roofline import floors_ms

    B, M, D, k, elem = 64, 1024, 768, 16, 4
    rates = {"copy_bytes_per_s": 2e12, "bf16_flops_per_s": 5e14}
    f = floors_ms(B, M, D, k, elem, rates)
    fwd = max((M * D + B * k * D + 4 * B * D) * elem / 2e12, (2 * B * M * D + 4 * B * B * D) / 5e14) * 1e3
    assert f["forward"] == pytest.approx(fwd) and f["fwd+bwd"] == pytest.approx(f["forward"] + f["backward"])
    bwd = max((B * k * D + 6 * B * D) * elem / 2e12, (8 * B * B * D + 4 * B * k * D) / 5e14) * 1e3
    assert f["backward"] == pytest.approx(bwd) and bwd == pytest.approx((B * k * D + 6 * B * D) * elem / 2e9)


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"], "--device"),
    (["--backends", "torch,nope"], "--backends: nope not available"),
    (["--json", "/nonexistent-folder/x.json"], "does not exist"),
    (["--seed", "x"], "--seed"),
])
def test_argument_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        C.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("python -m iscse.check: error:"), err
