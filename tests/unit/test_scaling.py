"""Scaling-law fits against synthetic data from known constants, the compute-optimal presets, run
collection from a Tandem run directory, sweep generation and the `scaling` verbs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from pretrain import scaling
from pretrain.scaling import ChinchillaLaw, KaplanLaw, RunPoint
from pretrain.scaling_cli import register

BUDGETS = np.geomspace(1e18, 1e22, 5)


def _isoflop(law: ChinchillaLaw, *, seed: int = 1, noise: float = 0.005) -> list[RunPoint]:
    centers = [law.optimal(c)[0] for c in BUDGETS]
    return scaling.synthetic_isoflop(law.loss, BUDGETS, centers, noise=noise, seed=seed)


@pytest.mark.parametrize(
    "law",
    [
        scaling.PRESETS["chinchilla-approach3"],
        scaling.PRESETS["epoch-refit"],
        ChinchillaLaw(E=2.2, A=900.0, B=1500.0, alpha=0.45, beta=0.30),
        ChinchillaLaw(E=1.2, A=150.0, B=3000.0, alpha=0.28, beta=0.40),
    ],
    ids=["approach3", "epoch-refit", "steep-N", "steep-D"],
)
def test_chinchilla_fit_recovers_exponents(law: ChinchillaLaw) -> None:
    fitted, _ = scaling.fit_chinchilla(_isoflop(law))
    # Acceptance: α and β within 5% from IsoFLOP points with 0.5% multiplicative noise.
    assert fitted.alpha == pytest.approx(law.alpha, rel=0.05)
    assert fitted.beta == pytest.approx(law.beta, rel=0.05)
    assert pytest.approx(law.E, rel=0.05) == fitted.E


def test_fit_warns_when_profiles_have_no_interior_minimum() -> None:
    law = scaling.PRESETS["epoch-refit"]
    good = _isoflop(law)
    assert scaling.fit_warnings(good, law) == []
    # Keep only the smaller half of each profile: the lowest loss sits at the largest N.
    half = [p for p in good if law.optimal(p.C)[0] / 1.5 >= p.N]
    warnings = scaling.fit_warnings(half, law)
    assert len(warnings) == len(BUDGETS) and all("no interior minimum" in w for w in warnings)
    degenerate = ChinchillaLaw(E=1e-12, A=1.0, B=1.0, alpha=4.4, beta=0.3)
    assert any("E=" in w for w in scaling.fit_warnings(good, degenerate))


def test_chinchilla_objective_gradient_matches_finite_differences() -> None:
    pts = _isoflop(scaling.PRESETS["epoch-refit"])
    n, d, loss = (np.array([getattr(p, k) for p in pts]) for k in ("N", "D", "loss"))
    args = (np.log(n), np.log(d), np.log(loss), 1e-3)
    theta = np.array([6.0, 7.5, 0.5, 0.33, 0.37])
    _, grad = scaling._chinchilla_objective(theta, *args)
    eps = 1e-7
    for i in range(5):
        step = np.zeros(5)
        step[i] = eps
        fd = (
            scaling._chinchilla_objective(theta + step, *args)[0]
            - scaling._chinchilla_objective(theta - step, *args)[0]
        ) / (2 * eps)
        assert grad[i] == pytest.approx(fd, rel=1e-4, abs=1e-9)
    # The vectorised grid scorer agrees with the scalar objective.
    grid = scaling.initial_grid()[:7]
    assert scaling._grid_objective(grid, *args) == pytest.approx(
        [scaling._chinchilla_objective(g, *args)[0] for g in grid]
    )


def test_kaplan_fit_recovers_exponents() -> None:
    # Kaplan et al. 2020's published constants, points over a grid of N and D, 0.5% noise.
    true = KaplanLaw(alpha_n=0.076, alpha_d=0.095, n_c=8.8e13, d_c=5.4e13)
    rng = np.random.default_rng(0)
    pts = []
    for n in np.geomspace(1e6, 1e9, 7):
        for d in np.geomspace(1e8, 1e11, 7):
            loss = float(true.loss(n, d)) * (1 + 0.005 * rng.standard_normal())
            pts.append(RunPoint(N=n, D=d, loss=loss, C=6 * n * d))
    law = scaling.fit_kaplan(pts)
    assert law.alpha_n == pytest.approx(0.076, rel=0.05)
    assert law.alpha_d == pytest.approx(0.095, rel=0.05)
    assert law.l_c is not None and law.l_n is not None and law.l_d is not None
    # L(N) alone on data-unlimited points (D -> infinity): the pure power law.
    ns = np.geomspace(1e6, 1e10, 9)
    l_n = (8.8e13 / ns) ** 0.076 * (1 + 0.005 * rng.standard_normal(9))
    single = scaling.fit_power_law(ns, l_n)
    assert single.exponent == pytest.approx(0.076, rel=0.05)


def test_presets_at_gopher_budget() -> None:
    # Besiroglu et al. 2024 refit: ≈ 70B parameters and ≈ 20 tokens per parameter at 5.76e23 FLOPs.
    refit = scaling.plan_budget(5.76e23, scaling.PRESETS["epoch-refit"])
    assert pytest.approx(70e9, rel=0.05) == refit.N
    assert refit.tokens_per_param == pytest.approx(20, rel=0.10)
    assert pytest.approx(5.76e23 / (6 * refit.N)) == refit.D
    # Hoffmann et al. 2022, Table 3, Approach 3: ≈ 40B at Gopher's budget.
    a3 = scaling.plan_budget(5.76e23, scaling.PRESETS["chinchilla-approach3"])
    assert pytest.approx(40e9, rel=0.05) == a3.N


def test_closed_form_is_the_isoflop_minimum() -> None:
    law = scaling.PRESETS["epoch-refit"]
    c = 1e21
    n_opt, _ = law.optimal(c)
    ns = np.geomspace(n_opt / 10, n_opt * 10, 20001)
    assert ns[np.argmin(law.loss(ns, c / (6 * ns)))] == pytest.approx(n_opt, rel=1e-3)


def test_bootstrap_intervals_cover_the_truth() -> None:
    law = ChinchillaLaw(E=2.2, A=900.0, B=1500.0, alpha=0.45, beta=0.30)
    pts = _isoflop(law)
    fitted, _ = scaling.fit_chinchilla(pts)
    ci = scaling.bootstrap_chinchilla(pts, fitted, samples=15, seed=0)
    lo, hi = ci["alpha"]
    assert lo <= fitted.alpha <= hi and hi - lo < 0.1
    # A degenerate law (E underflowed to 0, as on a CPU ladder without interior minima) still bootstraps.
    assert scaling.bootstrap_chinchilla(
        pts, ChinchillaLaw(E=0.0, A=1e21, B=150.0, alpha=4.4, beta=0.33), samples=2
    )


def test_run_point_from_a_run_directory(tmp_path: Path) -> None:
    from pretrain.config import load_config, save_config
    from pretrain.flops import non_embedding_params
    from pretrain.models.gpt import GPT

    cfg = load_config(
        None, ["model.preset=gpt-tiny", "model.vocab_size=512", "data.shards=x", "data.seq_len=64"]
    )
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    records = [
        {"step": 10, "loss": 5.0, "consumed_samples": 80},
        {"step": 10, "eval_loss": 4.5},
        {"step": 20, "loss": 4.0, "consumed_samples": 160},
        {"step": 20, "eval_loss": 4.2},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run / "checkpoints" / "step-20").mkdir(parents=True)
    (run / "checkpoints" / "step-20" / "meta.json").write_text(
        json.dumps({"consumed_samples": 160, "tokens": 10240})
    )
    point = scaling.run_point(run)
    assert non_embedding_params(GPT(cfg.model), cfg.model) == point.N
    assert point.D == 160 * 64
    assert point.loss == 4.2  # the last validation loss wins over training loss
    assert pytest.approx(6 * point.N * point.D) == point.C
    assert scaling.collect_runs([tmp_path]) == [point]  # a parent directory of runs works too
    with pytest.raises(scaling.ScalingError, match=r"no config\.yaml"):
        scaling.run_point(tmp_path)


def test_csv_reading(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("N,D,loss\n1e6,1e8,4.0\n2e6,5e7,3.9\n")
    pts = scaling.read_points_csv(path)
    assert pts[0].C == 6e14 and pts[1].loss == 3.9
    path.write_text("N,loss\n1,2\n")
    with pytest.raises(scaling.ScalingError, match="missing column"):
        scaling.read_points_csv(path)


def test_sweep_writes_valid_configs_and_an_array_script(tmp_path: Path) -> None:
    from pretrain.config import load_config

    budgets = [1e13, 1e14]
    sizes = [scaling.parse_shape("2x64"), scaling.parse_shape("2x128x4")]
    entries = scaling.generate_sweep(
        budgets, tmp_path, base_config=Path("configs/runs/smoke-gpt.yaml"), sizes=sizes, vocab_size=1024
    )
    assert len(entries) == 4
    for e in entries:
        cfg = load_config(e.config)  # valid Tandem run configs
        assert cfg.model.vocab_size == 1024 and cfg.train.steps == e.steps
        assert scaling.non_embedding_params_of(cfg.model) == e.N  # the formula matches the model
        assert pytest.approx(e.flops, rel=0.25) == 6 * e.N * e.D  # steps are rounded to whole batches
    script = (tmp_path / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "pretrain train --config" in script
    # Without --sizes, shapes bracket the law's optimum.
    auto = scaling.generate_sweep(
        [1e15],
        tmp_path / "auto",
        base_config=Path("configs/runs/smoke-gpt.yaml"),
        vocab_size=1024,
        per_budget=3,
    )
    ns = sorted(e.N for e in auto)
    assert ns[0] < scaling.PRESETS["epoch-refit"].optimal(1e15)[0] < ns[-1]


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="verb")
    register(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_fit_plan_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    law = ChinchillaLaw(E=2.0, A=500.0, B=1200.0, alpha=0.36, beta=0.31)
    csv_path = tmp_path / "points.csv"
    scaling.write_points_csv(_isoflop(law), csv_path)
    assert (
        _cli(
            [
                "scaling",
                "fit",
                "--csv",
                str(csv_path),
                "--bootstrap",
                "3",
                "--out",
                str(tmp_path / "fit"),
                "--json",
            ]
        )
        == 0
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"E", "A", "B", "alpha", "beta"}
    assert last["alpha"] == pytest.approx(0.36, rel=0.05)
    assert (tmp_path / "fit" / "scaling_fit.png").stat().st_size > 10_000

    assert _cli(["scaling", "plan", "--flops", "5.76e23", "--json"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out.strip().splitlines()[-1])
    assert set(plan) == {"N", "D", "tokens_per_param"} and plan["N"] == pytest.approx(70e9, rel=0.05)
    # Chinchilla's own budget: its 70B preset is the nearest (the planner compares parameter counts).
    assert "nearest model preset: chinchilla-70b" in out
    assert _cli(["scaling", "plan", "--flops", "5.76e23", "--preset", "chinchilla-approach3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["N"] == pytest.approx(40e9, rel=0.05)
    assert _cli(["scaling", "plan", "--flops", "1e21", "--fit", str(tmp_path / "fit" / "fit.json")]) == 0

    assert (
        _cli(["scaling", "fit", "--csv", str(csv_path), "--form", "kaplan", "--bootstrap", "0", "--json"])
        == 0
    )
    assert "alpha_N" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert (
        _cli(
            [
                "scaling",
                "sweep",
                "--flops",
                "1e13,1e14",
                "--sizes",
                "2x64,2x128",
                "--out",
                str(tmp_path / "sw"),
                "--vocab-size",
                "1024",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "sw" / "configs").glob("*.yaml"))) == 4

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"form": "kaplan", "alpha_N": 0.07}))
    assert _cli(["scaling", "plan", "--flops", "1e21", "--fit", str(bad)]) == 2
    assert "Chinchilla-form fit" in capsys.readouterr().err


def test_help_on_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["scaling", "--help"],
        ["scaling", "fit", "--help"],
        ["scaling", "plan", "--help"],
        ["scaling", "sweep", "--help"],
        ["plan", "--help"],
    ):
        with pytest.raises(SystemExit) as exc:
            _cli(argv)
        assert exc.value.code == 0
        assert "usage" in capsys.readouterr().out
