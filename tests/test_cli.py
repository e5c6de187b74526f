"""python -m jacext: every demo task on tiny sizes (both runs reach the same numbers, the PNG is
written), and explain."""
import json

import pytest

from jacext.__main__ import TASKS, main


@pytest.mark.parametrize("task", list(TASKS))
def test_demo_task_runs_and_both_runs_agree(task, tmp_path, capsys):
    png, out_json = tmp_path / "demo.png", tmp_path / "demo.json"
    rows = main(["demo", "--task", task, "--epochs", "2", "--batch", "512", "--hidden", "16", "--code", "4",
                 "--plot", str(png), "--device", "cpu", "--json", str(out_json)])
    saved = json.loads(out_json.read_text())
    assert saved["command"].startswith("python -m jacext demo --task") and saved["task"] == task
    assert [r["method"] for r in saved["results"]] == ["jacext", "torch.func"]
    assert saved["speedup"] == pytest.approx(saved["results"][1]["time_vs_jacext"])
    out = capsys.readouterr().out
    assert "measured in this run" in out and "torch.func vmap(jacrev)" in out
    jac, ref = rows["jacext"], rows["torch.func"]
    assert len(jac["curves"]["loss"]) == 3  # before training and after each epoch
    for a, b in zip(jac["curves"]["loss"] + jac["curves"]["penalty"], ref["curves"]["loss"] + ref["curves"]["penalty"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert jac["ms_per_step"] > 0 and ref["ms_per_step"] > 0
    assert png.exists() and png.stat().st_size > 10_000


def test_demo_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        main(["demo", "--code", "0"])


def test_explain_prints_the_plan(capsys):
    main(["explain", "--sizes", "784,256,256,10", "--batch", "128"])
    out = capsys.readouterr().out
    assert "reverse + Gram epilogue" in out and "<- chosen" in out


@pytest.mark.parametrize("quantity, expected", [("spectral_norm", "spectral norm"), ("laplacian", "forward Laplacian"),
                                                ("divergence", "divergence of MLP"),
                                                ("jacobian_diagonal", "jacobian_diagonal of MLP"),
                                                ("margin", "large-margin loss")])
def test_explain_prints_the_plan_of_each_quantity(capsys, quantity, expected):
    main(["explain", "--sizes", "16,64,64,16", "--batch", "32", "--quantity", quantity])
    out = capsys.readouterr().out
    assert expected in out and "<- chosen" in out


def test_explain_refuses_what_the_function_refuses(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--sizes", "16,64,10", "--quantity", "divergence"])
    assert "square net" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain", "--sizes", "16,64,10", "--method", "bogus"])
    assert "unknown method" in capsys.readouterr().err
