"""The GPU checks of bench/gpu_check.sh that are Python: torch.compile (default and
mode="reduce-overhead"), a CUDA-graph capture of one eager training step (a host sync would make
the capture fail), kernel launches per step, TF32 on and off, fp16 / bf16 autocast, and the
machine's cuBLAS float32 rate; plus the small case that the script runs under compute-sanitizer.

    python bench/gpu_check.py checks --out bench/results/gpu_check_cuda.json   # on a GPU
    python bench/gpu_check.py checks --device cpu --out /tmp/x.json              # what runs on a CPU
    python bench/gpu_check.py sanitize                                            # every op, tiny

Each check records "pass", "fail" (with the error) or "skip" (with why), and its figures; the
process exits with 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import jacext
from jacext.flows import MLPFlow

from common import machine_description, write_results  # bench/common.py

# The realistic classifier of the issues: 784-256-256-10 tanh, a batch of 512.
WIDTHS, BATCH = [784, 256, 256, 10], 512


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def classifier(device, seed=0):
    torch.manual_seed(seed)
    model = jacext.MLP(WIDTHS, activation="tanh").to(device)
    x = torch.randn(BATCH, WIDTHS[0], device=device)
    target = torch.randint(0, WIDTHS[-1], (BATCH,), device=device)
    return model, x, target


def penalty_loss(model, x, target):
    y, sq = jacext.jacobian_frobenius(model, x)
    return F.cross_entropy(y, target) + 0.01 * sq.mean()


def median_ms(fn, device, runs=20):
    fn()
    sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def check_compile(device):
    """torch.compile(fullgraph=True) of the penalty loss, default and reduce-overhead (CUDA graphs
    on a GPU), against eager: loss and gradients."""
    model, x, target = classifier(device)
    params = list(model.parameters())
    eager = penalty_loss(model, x, target)
    eager_grads = torch.autograd.grad(eager, params)
    figures = {}
    for mode in ("default", "reduce-overhead"):
        compiled = torch.compile(lambda x, t: penalty_loss(model, x, t), fullgraph=True,
                                 mode=None if mode == "default" else mode)
        for _ in range(3):  # reduce-overhead records its graph on a later call
            loss = compiled(x, target)
            grads = torch.autograd.grad(loss, params)
        torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-5)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)
        figures[f"{mode}_ms"] = median_ms(lambda: torch.autograd.grad(compiled(x, target), params), device)
    figures["eager_ms"] = median_ms(lambda: torch.autograd.grad(penalty_loss(model, x, target), params), device)
    return figures


def check_graph_capture(device):
    """One eager training step (forward, penalty, backward) captured into a CUDA graph and replayed:
    the capture fails on any host sync; the replay's gradients must equal the eager step's."""
    if device.type != "cuda":
        return "skip", "CUDA graphs need a GPU"
    model, x, target = classifier(device)
    static_x, static_target = x.clone(), target.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            penalty_loss(model, static_x, static_target).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = penalty_loss(model, static_x, static_target)
        static_loss.backward()
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    sync(device)
    replay_grads = [p.grad.clone() for p in model.parameters()]
    eager_grads = torch.autograd.grad(penalty_loss(model, new_x, target), list(model.parameters()))
    for g, e in zip(replay_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)

    def eager_step():
        model.zero_grad(set_to_none=True)
        penalty_loss(model, static_x, static_target).backward()

    return {"replay_ms": median_ms(graph.replay, device), "eager_ms": median_ms(eager_step, device)}


def check_launches(device):
    """CUDA kernels launched per training step (forward + backward), from the profiler."""
    if device.type != "cuda":
        return "skip", "kernel launches are counted on a GPU"
    from torch.profiler import ProfilerActivity, profile

    figures = {}
    for name, widths, output in (("classifier 784-256-256-10", WIDTHS, None), ("penultimate 64-256-256", [64, 256, 256], "tanh")):
        torch.manual_seed(0)
        model = jacext.MLP(widths, activation="tanh", output_activation=output).to(device)
        x = torch.randn(BATCH, widths[0], device=device)

        def step():
            model.zero_grad(set_to_none=True)
            jacext.jacobian_frobenius(model, x)[1].mean().backward()

        step()
        sync(device)
        steps = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        figures[name] = len(kernels) / steps
    return figures


def check_tf32(device):
    """The penalty with TF32 off and on, against float64: the error jacext warns about."""
    if device.type != "cuda":
        return "skip", "TF32 is a GPU setting"
    model, x, _ = classifier(device)
    exact = jacext.jacobian_frobenius(model.double(), x.double())[1]
    model = model.float()
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    figures = {}
    try:
        for tf32 in (False, True):
            matmul.allow_tf32 = tf32
            sq = jacext.jacobian_frobenius(model, x)[1]
            figures[f"tf32_{'on' if tf32 else 'off'}_max_rel_error"] = float(((sq.double() - exact).abs() / exact).max())
            figures[f"tf32_{'on' if tf32 else 'off'}_ms"] = median_ms(
                lambda: jacext.jacobian_frobenius(model, x)[1].sum().backward(), device)
    finally:
        matmul.allow_tf32 = before
    if figures["tf32_off_max_rel_error"] > 1e-4:
        raise AssertionError(f"float32 without TF32 is off by {figures['tf32_off_max_rel_error']:.2e}")
    return figures


def check_autocast(device):
    """Under autocast the ops run in float32: equal to float32 on the rounded inputs."""
    model, x, target = classifier(device)
    figures = {}
    dtypes = (torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.bfloat16,)
    for dtype in dtypes:
        xh = x.to(dtype)
        with torch.autocast(device.type, dtype=dtype):
            y, sq = jacext.jacobian_frobenius(model, xh)
            loss = F.cross_entropy(y, target) + 0.01 * sq.mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        y_ref, sq_ref = jacext.jacobian_frobenius(model, xh.float())
        grads_ref = torch.autograd.grad(F.cross_entropy(y_ref, target) + 0.01 * sq_ref.mean(), list(model.parameters()))
        assert sq.dtype == torch.float32
        torch.testing.assert_close(sq, sq_ref, rtol=1e-4, atol=1e-5)
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
        figures[str(dtype).replace("torch.", "")] = float(((sq - sq_ref).abs() / sq_ref).max().detach())
    return figures


def check_cublas_rate(device):
    """The machine's float32 GEMM rate (8192^3, TF32 off): what the bench's GFLOP/s compare to."""
    if device.type != "cuda":
        return "skip", "cuBLAS is a GPU library"
    a = torch.randn(8192, 8192, device=device)
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        ms = median_ms(lambda: a @ a, device, runs=10)
    finally:
        matmul.allow_tf32 = before
    return {"sgemm_8192_ms": ms, "tflops": 2 * 8192 ** 3 / (ms * 1e-3) / 1e12}


CHECKS = {"compile": check_compile, "graph_capture": check_graph_capture, "launches": check_launches,
          "tf32": check_tf32, "autocast": check_autocast, "cublas_rate": check_cublas_rate}


def run_checks(args):
    device = torch.device(args.device)
    results, failed = {}, False
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            out = check(device)
            if isinstance(out, tuple):
                status, detail = out
                results[name] = {"status": status, "why": detail}
            else:
                results[name] = {"status": "pass", "figures": out}
        except Exception as error:  # a failed check is reported, and the others still run
            failed = True
            results[name] = {"status": "fail", "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc(limit=4)}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name:14} {results[name]['status']:5} {results[name]['seconds']:6.1f} s  "
              f"{json.dumps(results[name].get('figures', results[name].get('why', results[name].get('error'))))}",
              flush=True)
    write_results(args.out, "gpu_check", args.device, False,
                  {"machine": machine_description(args.device), "torch": torch.__version__,
                   "cuda": torch.version.cuda, "checks": results})
    return 1 if failed else 0


def sanitize_case(args):
    """Every op forward, backward and double backward on tiny sizes (for compute-sanitizer)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = jacext.MLP([7, 9, 8, 5], activation="tanh").to(device)
    x = torch.randn(6, 7, device=device, requires_grad=True)
    target = torch.randint(0, 5, (6,), device=device)
    total = 0
    for method in ("reverse", "forward", "gram", "hutchinson"):
        kwargs = {"n_proj": 3} if method == "hutchinson" else {}
        y, sq = jacext.jacobian_frobenius(model, x, method=method, **kwargs)
        (gx,) = torch.autograd.grad(sq.sum() + y.sum(), x, create_graph=True)
        total = total + gx.square().sum()
    total = total + sum(j.sum() for j in jacext.jacobian(model, x, layer=(0, 1)))
    total = total + jacext.jacobian_gram(model, x).sum()
    total = total + jacext.large_margin_loss(model, x, target, layers=(0, 1), top_k=2, use_approximation=False)
    flow = MLPFlow(7, 2).to(device)
    total = total + flow.nll(x, relative_gradient=True) + flow.nll(x)
    total.backward()
    sync(device)
    print(f"sanitize case ran on {device}: {float(total):.6g}")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["checks", "sanitize"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_check_<device>.json)")
    args = parser.parse_args()
    sys.exit(run_checks(args) if args.what == "checks" else sanitize_case(args))


if __name__ == "__main__":
    main()
