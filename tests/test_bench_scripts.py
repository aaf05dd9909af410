"""The GPU check's scripts on CPU: argument handling and plans of bench/gpu_bench.py, bench/train_step_bench.py and
bench/device_check.sh, and one tiny item of gpu_bench's ``--cpu-smoke`` end to end (worker process, JSON).

The GPU machine runs these scripts once, with no chance to fix them there; these checks are what can be made here.
"""
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO


def _load(name):
    """Import bench/<name>.py (bench/ is not a package) under a private module name."""
    key = f"_iscse_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before exec: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module")
def gpu_bench():
    return _load("gpu_bench")


def test_parse_shapes_and_choices(gpu_bench):
    assert gpu_bench.parse_shapes("512x65536x1024x16, 64X1024x768x16") == [(512, 65536, 1024, 16),
                                                                          (64, 1024, 768, 16)]
    for bad in ("", "64x1024x768", "64x1024x768x0", "axbxcxd", "2048x1024x768x16", "64x16x768x16"):
        with pytest.raises(ValueError, match="--shapes"):
            gpu_bench.parse_shapes(bad)
    assert gpu_bench.parse_choices("triton,reference,triton", gpu_bench.IMPLS, "--impls") == ("triton", "reference")
    with pytest.raises(ValueError, match="--impls: unknown 'cuda'"):
        gpu_bench.parse_choices("triton,cuda", gpu_bench.IMPLS, "--impls")


def test_default_plan_is_in_order_of_value(gpu_bench):
    items = gpu_bench.plan_items(gpu_bench.PLAN_SHAPES)
    ids = [it["id"] for it in items]
    # (a) bf16 then fp32, the fused step first; then (b) the paper's shape; then (c) M = 1,048,576
    assert ids[:5] == ["triton 512x65536x1024x16 bf16", "reference 512x65536x1024x16 bf16",
                       "torch 512x65536x1024x16 bf16", "triton_graph 512x65536x1024x16 bf16",
                       "triton 512x65536x1024x16 fp32"]
    assert ids.index("triton 64x1024x768x16 fp32") < ids.index("triton 1024x1048576x768x16 bf16")
    # the precision study, then torch.compile last (the paper's shape first), never at M = 1,048,576
    compiles = [i for i, it in enumerate(items) if it["impl"] == "compile"]
    assert ids[compiles[0]] == "compile 64x1024x768x16 fp32" and compiles[-1] == len(items) - 1
    assert ids.index("precision study") < compiles[0]
    assert all(it["shape"][1] <= 65536 for it in items if it["impl"] == "compile")
    assert all(it["limit_s"] > 0 for it in items)


def test_compile_only_plan_brings_its_reference(gpu_bench):
    items = gpu_bench.plan_items([(64, 1024, 768, 16)], impls=("compile",), precision=False)
    assert [it["id"] for it in items] == ["reference 64x1024x768x16 fp32", "compile 64x1024x768x16 fp32"]
    smoke = gpu_bench.plan_items([(5, 37, 13, 7)], impls=gpu_bench.IMPLS, precision=False, smoke=True)
    assert "triton_graph" not in {it["impl"] for it in smoke}


def test_gpu_bench_command_line_errors():
    for args in (["--shapes", "64x1024"], ["--impls", "cuda"], ["--dtypes", "fp8"], ["--budget", "0"]):
        res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), *args], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.strip().count("\n") == 0 and "error" in res.stderr and "Traceback" not in res.stderr


def test_device_check_arguments_fail_before_running_anything(tmp_path):
    for args in (["--only", "tests,nope"], ["--bound", "tests"], ["--budget", "-5"], ["--frobnicate"]):
        res = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), *args], capture_output=True,
                             text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.startswith("device_check.sh: error:") and res.stderr.count("\n") == 1
        assert not (tmp_path / "out").exists()
    res = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "--only" in res.stdout and "--dry-run" in res.stdout


def test_train_step_recipes_differ_only_where_meant():
    tsb = _load("train_step_bench")
    paper, ours = tsb.paper_recipe(), tsb.ours_recipe()
    assert (paper.autocast, paper.loss_backend, paper.adamw) == (None, "reference", {})
    assert (ours.autocast, ours.loss_backend, ours.adamw) == ("bf16", "auto", {"fused": True})
    assert tsb.main(["--dry-run", "--batch", "0"]) == 2
    assert tsb.main(["--dry-run", "--batch", "8", "--buffer-size", "4"]) == 2


@pytest.mark.slow
def test_cpu_smoke_of_one_item_writes_json(tmp_path):
    """One tiny item through the supervisor and a worker process, as on the GPU machine."""
    out = tmp_path / "smoke.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--cpu-smoke", "--shapes",
                          "5x37x13x7", "--impls", "torch", "--no-precision", "--json", str(out), "--budget", "60"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    assert [(it["id"], it["status"]) for it in doc["items"]] == [("torch 5x37x13x7 fp32", "ok")]
    assert {r["mode"] for r in doc["rows"]} == {"fwd+bwd", "forward", "backward"}
    assert all(r["median_ms"] > 0 and r["floor_ms"] > 0 for r in doc["rows"])
    assert {"torch", "triton", "python", "date", "device", "rates"} <= set(doc)


def test_memory_plan_of_the_fused_step(gpu_bench):
    """The Triton step's peak extra memory, counted on ``meta`` tensors with the CUDA configuration of a 132-SM
    card (``gpu_bench.py --memory``): under the GPU issue's 64 MiB at B = 1024, M = 1,048,576, D = 768 (fp32 and
    bf16), where the forward makes the gradients and holds neither the ``B x k x D`` neighbour rows (48 MiB fp32)
    nor the InfoNCE partials; held at the paper's shape, where that saves a launch; the counter sees the
    rows when they are held."""
    pytest.importorskip("triton")
    import torch

    big = (1024, 1 << 20, 768, 16)
    for dt in (torch.float32, torch.bfloat16):
        plan = gpu_bench.memory_plan(*big, dt)
        assert not plan["held"] and plan["peak_bytes"] < 64 * 2**20, plan
        held = gpu_bench.memory_plan(*big, dt, hold=True)
        assert held["peak_bytes"] - plan["peak_bytes"] >= 1024 * 16 * 768 * dt.itemsize, (plan, held)
    paper = gpu_bench.memory_plan(64, 1024, 768, 16, torch.float32)
    assert paper["held"] and paper["peak_bytes"] < 8 * 2**20, paper
    assert paper["largest"][0] == dict(shape=[64, 16, 768], dtype="torch.float32", bytes=64 * 16 * 768 * 4)
