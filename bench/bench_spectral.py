"""Per-sample spectral norm ||J||_2 and Hutch++: jacext against torch.func, and the estimators'
errors.

Timed (loss forward + backward to every parameter, each method in its own process):
  spectral norm, loss = mean_b s_b, s_b = ||d y_b / d x_b||_2:
    jacext-auto        jacext.jacobian_spectral_norm, the path it picks (exact here: J J^T, m x m)
    jacext-power       method="power", the default tol and n_iter, a fresh random start per call
    jacext-power-warm  method="power" started from the previous call's vectors on the same batch
                       and weights: the best case of a warm start (training moves the weights)
    vmap-jacrev        torch.func vmap(jacrev) per-sample Jacobians, torch.linalg.matrix_norm(J, 2)
  Frobenius penalty, loss = mean_b ||J_b||_F^2, at k Jacobian-vector products:
    frobenius-exact    jacext.jacobian_frobenius, exact (for scale)
    hutchinson-k / hutch++-k   the two estimators at the same k
Errors (not timed, this process): the relative RMS error of Hutchinson's and Hutch++'s estimates
of ||J||_F^2 over seeded draws at k in {4, 16, 64}, and the root of the mean of each method's own
variance estimate (return_variance), on P1 at its random initialization, P1 with weights of
decaying singular values (U diag(1/i) V^T, as trained nets tend to have) and an autoencoder.

    python bench/bench_spectral.py              # 784-256-256-10 tanh, B=128
    python bench/bench_spectral.py --repeats 5  # ratios as the median of 5 runs
    python bench/bench_spectral.py --smoke      # tiny sizes, seconds (CI)
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

import jacext
from jacext.reference import spectral_norm_ref

from common import TIME_KEY, machine_description, report, run_worker, summarise, time_step, write_results  # bench/common.py

CASE = dict(widths=[784, 256, 256, 10], batch=128)
SMOKE_CASE = dict(widths=[20, 16, 16, 5], batch=6)
KS = (4, 16, 64)
SMOKE_KS = (4, 16)
SPECTRAL_METHODS = ["jacext-auto", "jacext-power", "jacext-power-warm", "vmap-jacrev"]
# error nets: name -> (widths, batch, weights with decaying singular values)
ERROR_NETS = {"P1": ([784, 256, 256, 10], 128, False), "P1-decay": ([784, 256, 256, 10], 128, True),
              "AE": ([784, 256, 64, 256, 784], 32, False)}
SMOKE_ERROR_NETS = {"S1": ([20, 16, 16, 5], 6, False), "S1-decay": ([20, 16, 16, 5], 6, True)}


def timed_methods(ks):
    return SPECTRAL_METHODS + ["frobenius-exact"] + [f"{m}-{k}" for k in ks for m in ("hutchinson", "hutch++")]


def make_model(widths, decaying=False, seed=0):
    torch.manual_seed(seed)
    model = jacext.MLP(widths, activation="tanh")
    if decaying:  # W = U diag(sigma_i) V^T with sigma_i = sigma_1 / i, sigma_1 from the init's W
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    u, sv, vh = torch.linalg.svd(layer.weight, full_matrices=False)
                    layer.weight.copy_(u @ torch.diag(sv[0] / torch.arange(1, len(sv) + 1)) @ vh)
    return model


def make_step(method, model, x):
    """The timed function: the loss's forward and its backward to every parameter."""
    params = list(model.parameters())
    state = {}
    if method == "jacext-auto":
        def loss():
            return jacext.jacobian_spectral_norm(model, x)[1].mean()
    elif method == "jacext-power":
        def loss():
            return jacext.jacobian_spectral_norm(model, x, method="power")[1].mean()
    elif method == "jacext-power-warm":
        # converged vectors to start from (the previous call's, had it run to the end)
        state["u"] = jacext.jacobian_spectral_norm(model, x, method="power", n_iter=10_000, return_vectors=True)[2]

        def loss():
            _, s, state["u"] = jacext.jacobian_spectral_norm(model, x, method="power", init=state["u"],
                                                             return_vectors=True)
            return s.mean()
    elif method == "vmap-jacrev":
        def loss():
            return spectral_norm_ref(model, x)[1].mean()
    elif method == "frobenius-exact":
        def loss():
            return jacext.jacobian_frobenius(model, x)[1].mean()
    else:
        estimator, k = method.rsplit("-", 1)

        def loss():
            return jacext.jacobian_frobenius(model, x, method=estimator, n_proj=int(k))[1].mean()

    def step():
        value = loss()
        torch.autograd.grad(value, params, allow_unused=True)  # the output bias has no gradient in ||J||
        return value

    return step


def worker(args, case, method):
    """Time one method in this process; print its RESULT line."""
    model = make_model(case["widths"]).to(args.device)
    x = torch.randn(case["batch"], case["widths"][0], generator=torch.Generator().manual_seed(1)).to(args.device)
    step = make_step(method, model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = step().detach().item()  # warm-up, and the value the spectral methods must agree on
        timing = time_step(step, args.min_run_time)
    row = {"case": "spectral" if method in SPECTRAL_METHODS else "frobenius", "method": method, "repeat": args.repeat,
           **timing, "loss": value,
           "unconverged_warnings": sum(issubclass(w.category, RuntimeWarning) for w in caught)}
    if method.startswith("jacext-"):
        plan = jacext.explain(model, x, method="power" if "power" in method else "auto", quantity="spectral_norm")
        row["path"] = plan.path_name(plan.choice)
    report(row)


def relative_errors(nets, ks, draws):
    """Per net, k and estimator: the relative RMS error over `draws` seeded draws per sample, and
    the root of the mean returned variance, both relative to the exact ||J||_F^2."""
    rows = []
    for name, (widths, batch, decaying) in nets.items():
        model = make_model(widths, decaying).double()
        x = torch.randn(batch, widths[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        with torch.no_grad():
            exact = jacext.jacobian_frobenius(model, x)[1]
            spectrum = torch.linalg.svdvals(jacext.jacobian(model, x[:8]))
        for k in ks:
            for method in ("hutchinson", "hutch++"):
                errors, variances = [], []
                for seed in range(draws):
                    with torch.no_grad():
                        _, est, var = jacext.jacobian_frobenius(model, x, method=method, n_proj=k, return_variance=True,
                                                                generator=torch.Generator().manual_seed(seed))
                    errors.append(((est - exact) / exact).square())
                    variances.append(var / exact.square())
                rows.append({"net": name, "widths": widths, "batch": batch, "decaying_weights": decaying, "k": k,
                             "method": method, "draws": draws,
                             "relative_rms_error": torch.stack(errors).mean().sqrt().item(),
                             "relative_rms_predicted": torch.stack(variances).mean().sqrt().item(),
                             "s2_over_s1": (spectrum[:, 1] / spectrum[:, 0]).median().item() if widths[-1] > 1 else None,
                             "top_share_of_frobenius": (spectrum[:, 0] ** 2 / spectrum.square().sum(1)).median().item()})
                print(f"[errors] {name} k={k} {method}: {rows[-1]['relative_rms_error']:.3g}", file=sys.stderr, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed runs per method")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every method this many times over (each in its own process); the table gives "
                        "the median time and the median of the per-run ratios")
    parser.add_argument("--draws", type=int, default=20, help="seeded draws per sample for the error table")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the timed methods")
    parser.add_argument("--no-errors", action="store_true", help="skip the error table")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/spectral_cpu[_smoke].json)")
    parser.add_argument("--worker", metavar="METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    case = SMOKE_CASE if args.smoke else CASE
    ks = SMOKE_KS if args.smoke else KS
    if args.smoke:
        args.min_run_time, args.draws = min(args.min_run_time, 0.2), min(args.draws, 3)
    if args.worker:
        worker(args, case, args.worker)
        return

    methods = args.methods.split(",") if args.methods else timed_methods(ks)
    runs = []
    for repeat in range(args.repeats):
        for method in methods:
            command = ["--worker", method, "--device", args.device, "--min-run-time", args.min_run_time,
                       "--repeat", repeat] + (["--smoke"] if args.smoke else [])
            runs.append(run_worker(__file__, command, method))
            print(f"[{len(runs)}/{len(methods) * args.repeats}] {method}: {runs[-1][TIME_KEY] * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)

    losses = {r["method"]: r["loss"] for r in runs if r["repeat"] == 0}
    for method in ("jacext-auto", "jacext-power", "jacext-power-warm"):  # the exact value, to the power path's tol
        if method in losses and "vmap-jacrev" in losses and \
                abs(losses[method] - losses["vmap-jacrev"]) > 1e-3 * abs(losses["vmap-jacrev"]):
            sys.exit(f"{method}'s mean s {losses[method]} differs from torch.func's {losses['vmap-jacrev']}")

    def baseline(method):
        return "jacext-auto" if method in SPECTRAL_METHODS else "frobenius-exact"

    results = summarise(runs, ("method",), lambda row: {"method": baseline(row["method"])}, "time_vs_baseline")
    for row in results:
        row["unconverged_warnings"] = sum(r["unconverged_warnings"] for r in runs if r["method"] == row["method"])

    machine = machine_description(args.device)
    print(f"\n{machine}; float32; MLP {case['widths']} (tanh), B={case['batch']}; loss forward+backward, median"
          + (f" over {args.repeats} runs (each method in its own process; ratio: the median of the per-run ratios)"
             if args.repeats > 1 else " (each method in its own process)") + "\n")
    header = f"{'method':18} {'median ms':>10} {'x base':>8}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        note = [f"vs {baseline(r['method'])}"]
        if "path" in r:
            note.append(r["path"])
        if r["unconverged_warnings"]:
            note.append(f"{r['unconverged_warnings']} calls warned: not converged to tol")
        if args.repeats > 1 and "time_vs_baseline_range" in r and r["method"] != baseline(r["method"]):
            low, high = r["time_vs_baseline_range"]
            note.append(f"ratio over {args.repeats} runs {low:.3g}-{high:.3g}")
        ratio = f"{r['time_vs_baseline']:8.3g}" if "time_vs_baseline" in r else " " * 8
        print(f"{r['method']:18} {r[TIME_KEY] * 1e3:10.2f} {ratio}  {', '.join(note)}")
    vmap = next((r for r in results if r["method"] == "vmap-jacrev"), None)
    auto = next((r for r in results if r["method"] == "jacext-auto"), None)
    if vmap and auto:
        print(f"\njacext-auto is {vmap[TIME_KEY] / auto[TIME_KEY]:.3g}x faster than vmap(jacrev) + matrix_norm "
              f"(median ratio {vmap['time_vs_baseline']:.3g}; target >= 5)")

    errors = []
    if not args.no_errors:
        errors = relative_errors(SMOKE_ERROR_NETS if args.smoke else ERROR_NETS, ks, args.draws)
        print(f"\n||J||_F^2 estimates, float64, {args.draws} seeded draws per sample: relative RMS error "
              f"(measured / predicted by return_variance)\n")
        header = f"{'net':9} {'s2/s1':>6} {'s1^2/F':>7} " + "".join(f"{'k=' + str(k):>30}" for k in ks)
        print(header)
        print(f"{'':24}" + "".join(f"{'hutchinson':>15}{'hutch++':>15}" for _ in ks))
        for net in dict.fromkeys(r["net"] for r in errors):
            mine = {(r["k"], r["method"]): r for r in errors if r["net"] == net}
            first = next(iter(mine.values()))
            s21 = f"{first['s2_over_s1']:6.3f}" if first["s2_over_s1"] is not None else " " * 6
            cells = "".join(f"{_cell(mine[(k, m)]):>15}" for k in ks for m in ("hutchinson", "hutch++"))
            print(f"{net:9} {s21} {first['top_share_of_frobenius']:7.3f} {cells}")
        print("\n(s2/s1 and s1^2/F: the median over 8 samples of J's second-to-first singular value ratio and of the "
              "top singular value's share of ||J||_F^2)")
    write_results(args.out, "spectral", args.device, args.smoke,
                  {"machine": machine, "case": case, "repeats": args.repeats, "results": results, "runs": runs,
                   "errors": errors})


def _cell(row):
    error, predicted = row["relative_rms_error"], row["relative_rms_predicted"]
    return "exact" if error < 1e-12 else f"{error:.2g}/{predicted:.2g}"


if __name__ == "__main__":
    main()
