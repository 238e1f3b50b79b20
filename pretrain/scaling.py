"""Scaling laws: collect (N, D, C, loss) from runs, fit Kaplan and Chinchilla laws, plan budgets, sweep.

Conventions (see docs/scaling.md):
- N is Tandem's non-embedding parameter count (`pretrain.flops.non_embedding_params`: every block, the
  final norm and the LM-head matmul; token and position embeddings excluded), the same N whose 6·N is the
  per-token training cost in docs/mfu.md.
- D is training tokens: consumed samples × data.seq_len.
- C is 6·N·D (the approximation the compute-optimal closed form assumes; Kaplan et al. 2020 §2.1).
- loss is the last validation loss of the run if it has one, else the last logged training loss.

Fits:
- Kaplan et al. 2020: L(N) = (N_c/N)^αN, L(D) = (D_c/D)^αD, L(C) = (C_c/C)^αC on the compute frontier, and
  the joint L(N, D) = [(N_c/N)^(αN/αD) + D_c/D]^αD (their eq. 1.5).
- Hoffmann et al. 2022 (Chinchilla, Approach 3, appendix D.2): L(N, D) = E + A/N^α + B/D^β, fitted by
  minimizing the Huber loss (δ = 1e-3) between the log of the prediction, written as
  LSE(a − α·log N, b − β·log D, e) with A = e^a, B = e^b, E = e^e, and the observed log-loss, with
  L-BFGS started from a grid of initial points.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, appendix D.2


class ScalingError(ValueError):
    """A run directory, CSV or request that cannot be used, with the reason."""


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class RunPoint:
    """One training run reduced to what the laws need."""

    N: float  # non-embedding parameters
    D: float  # training tokens
    loss: float  # nats/token
    C: float  # training FLOPs (6·N·D unless the CSV gives it)
    source: str = ""


def non_embedding_params_of(model_cfg: Any) -> int:
    """Tandem's N for a `ModelConfig`, counted on a model built on the meta device (no memory). A GPT is
    built with one block and the other L - 1 blocks added by multiplication (blocks are identical), so
    even 175B-class presets count in milliseconds."""
    import dataclasses

    import torch

    from pretrain.flops import non_embedding_params
    from pretrain.models import build_model

    if model_cfg.vocab_size <= 0:
        raise ScalingError(f"model.vocab_size={model_cfg.vocab_size}: must be set to count parameters")
    one = dataclasses.replace(model_cfg, num_layers=1) if model_cfg.family == "gpt" else model_cfg
    with torch.device("meta"):
        model = build_model(one)
    n = int(non_embedding_params(model, one))
    if one is not model_cfg:
        n += (model_cfg.num_layers - 1) * sum(p.numel() for p in model.blocks[0].parameters())  # type: ignore[index,union-attr]
    return n


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ScalingError(f"{path}:{i}: not a JSON line ({exc.msg})") from None
    return records


def run_point(run_dir: str | Path) -> RunPoint:
    """(N, D, C, loss) of one Tandem run directory (config.yaml, metrics.jsonl, checkpoints/*/meta.json)."""
    from pretrain.config import load_config

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ScalingError(f"{run_dir}: no config.yaml (not a Tandem run directory)")
    cfg = load_config(cfg_path, validate=False)
    n = float(non_embedding_params_of(cfg.model))

    metrics_path = run_dir / "metrics.jsonl"
    records = _read_jsonl(metrics_path) if metrics_path.is_file() else []
    train_recs = [r for r in records if "loss" in r and r.get("loss") is not None]
    eval_recs = [r for r in records if r.get("eval_loss") is not None]
    if eval_recs:
        loss = float(eval_recs[-1]["eval_loss"])
    elif train_recs:
        loss = float(train_recs[-1]["loss"])
    else:
        raise ScalingError(f"{metrics_path}: no loss or eval_loss record")

    consumed = max((int(r.get("consumed_samples", 0)) for r in train_recs), default=0)
    for meta in sorted((run_dir / "checkpoints").glob("step-*/meta.json")):
        consumed = max(consumed, int(json.loads(meta.read_text()).get("consumed_samples", 0)))
    if consumed <= 0:
        raise ScalingError(f"{run_dir}: no consumed_samples in metrics.jsonl or checkpoints/*/meta.json")
    d = float(consumed * cfg.data.seq_len)
    return RunPoint(N=n, D=d, loss=loss, C=6.0 * n * d, source=str(run_dir))


def _run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Each path is a run directory, or a directory whose children are run directories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            out.append(p)
        elif p.is_dir():
            children = sorted(c for c in p.iterdir() if (c / "config.yaml").is_file())
            if not children:
                raise ScalingError(f"{p}: neither a run directory nor a directory of run directories")
            out += children
        else:
            raise ScalingError(f"{p}: no such directory")
    return out


def collect_runs(paths: Iterable[str | Path]) -> list[RunPoint]:
    return [run_point(d) for d in _run_dirs(paths)]


def read_points_csv(path: str | Path) -> list[RunPoint]:
    """CSV with a header naming columns N, D, loss and optionally C (C defaults to 6·N·D)."""
    path = Path(path)
    points = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"N", "D", "loss"} - set(reader.fieldnames or [])
        if missing:
            raise ScalingError(f"{path}: missing column(s) {', '.join(sorted(missing))}; need N,D,loss[,C]")
        for i, row in enumerate(reader, start=2):
            try:
                n, d, loss = float(row["N"]), float(row["D"]), float(row["loss"])
                c = float(row["C"]) if row.get("C") not in (None, "") else 6.0 * n * d
            except ValueError as exc:
                raise ScalingError(f"{path}:{i}: {exc}") from None
            if min(n, d, loss, c) <= 0:
                raise ScalingError(f"{path}:{i}: N, D, loss and C must all be > 0, got {row}")
            points.append(RunPoint(N=n, D=d, loss=loss, C=c, source=f"{path}:{i}"))
    return points


def write_points_csv(points: Sequence[RunPoint], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["N", "D", "loss", "C", "source"])
        for p in points:
            w.writerow([p.N, p.D, p.loss, p.C, p.source])


def _arrays(points: Sequence[RunPoint]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.array([p.N for p in points], dtype=np.float64)
    d = np.array([p.D for p in points], dtype=np.float64)
    loss = np.array([p.loss for p in points], dtype=np.float64)
    return n, d, loss


# ----------------------------------------------------------------------------- Chinchilla


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: Any, d: Any) -> Any:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """Compute-optimal (N, D) under C = 6·N·D (Hoffmann et al. 2022, eq. 4):
        N_opt = G·(C/6)^(β/(α+β)), D_opt = C/(6·N_opt), G = (α·A/(β·B))^(1/(α+β))."""
        if flops <= 0:
            raise ScalingError(f"flops={flops}: must be > 0")
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n_opt = g * (flops / 6.0) ** (b / (a + b))
        return n_opt, flops / (6.0 * n_opt)

    def params(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta}


PRESETS: dict[str, ChinchillaLaw] = {
    # Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (refit of Hoffmann's data).
    "epoch-refit": ChinchillaLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
    # Hoffmann et al. 2022, Approach 3 (unrounded exponents).
    "chinchilla-approach3": ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.3392, beta=0.2849),
}
DEFAULT_PRESET = "epoch-refit"


def _chinchilla_objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(LSE(a − α log N, b − β log D, e) − log L) and its gradient in θ = (a, b, e, α, β)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, P)
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    pred = top + np.log(w.sum(axis=0))
    w /= w.sum(axis=0)  # softmax: d pred / d term
    r = pred - log_loss
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))  # dHuber/dr
    grad = np.array(
        [
            (dr * w[0]).sum(),
            (dr * w[1]).sum(),
            (dr * w[2]).sum(),
            -(dr * w[0] * log_n).sum(),
            -(dr * w[1] * log_d).sum(),
        ]
    )
    return float(value), grad


def initial_grid() -> np.ndarray:
    """Hoffmann et al.'s grid of starts: α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}."""
    ab = np.arange(0.0, 2.01, 0.5)
    e = np.arange(-1.0, 1.01, 0.5)
    ac = np.arange(0.0, 25.01, 5.0)
    mesh = np.meshgrid(ac, ac, e, ab, ab, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)  # (4500, 5): a, b, e, α, β


def _grid_objective(
    grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float
) -> np.ndarray:
    """The Huber objective at every row of `grid` (G, 5) at once."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))  # each (G, 1)
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    r = np.logaddexp.reduce(terms, axis=0) - log_loss  # (G, P)
    huber = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    return huber.sum(axis=1)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """L-BFGS-B's BLAS calls on 5-vectors slow down ~100x when OpenBLAS spreads them over busy cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _lbfgs(x0: np.ndarray, args: tuple) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    res = minimize(
        _chinchilla_objective,
        x0,
        args=args,
        jac=True,
        method="L-BFGS-B",
        # The objective is ~1e-4 and L-BFGS-B's ftol is effectively absolute below 1: keep it tight.
        options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-11},
    )
    return res.x, float(res.fun)


def fit_chinchilla(
    points: Sequence[RunPoint],
    *,
    delta: float = HUBER_DELTA,
    starts: int | None = 16,
    extra_starts: Sequence[np.ndarray] = (),
) -> tuple[ChinchillaLaw, float]:
    """Hoffmann et al. 2022 (appendix D.2) fit; returns the law and its Huber objective.

    Every point of the 4500-point initial grid is scored; L-BFGS then runs from the `starts` best ones
    (None runs from all 4500, as the paper does; the best few always contain the winner in our tests and
    are ~100x cheaper)."""
    if len(points) < 5:
        raise ScalingError(f"Chinchilla form has 5 parameters; got {len(points)} point(s), need >= 5")
    n, d, loss = _arrays(points)
    args = (np.log(n), np.log(d), np.log(loss), delta)
    grid = initial_grid()
    if starts is not None and starts < len(grid):
        grid = grid[np.argsort(_grid_objective(grid, *args))[:starts]]
    best_x, best_f = None, math.inf
    with _one_blas_thread():
        for x0 in [*extra_starts, *grid]:
            x, f = _lbfgs(np.asarray(x0, dtype=np.float64), args)
            if f < best_f and np.all(np.isfinite(x)):
                best_x, best_f = x, f
    if best_x is None:
        raise ScalingError("Chinchilla fit: no start converged to a finite optimum")
    a, b, e, alpha, beta = best_x
    law = ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))
    return law, best_f


# ----------------------------------------------------------------------------- Kaplan


@dataclass(frozen=True)
class PowerLaw:
    """L(X) = (X_c / X)^exponent (Kaplan et al. 2020, eqs. 1.1-1.3)."""

    exponent: float
    scale: float  # X_c

    def loss(self, x: Any) -> Any:
        return np.power(self.scale / np.asarray(x, dtype=np.float64), self.exponent)


@dataclass(frozen=True)
class KaplanLaw:
    """Joint L(N, D) = [(N_c/N)^(αN/αD) + D_c/D]^αD (Kaplan et al. 2020, eq. 1.5) plus the 1-D laws."""

    alpha_n: float
    alpha_d: float
    n_c: float
    d_c: float
    l_n: PowerLaw | None = None  # fitted on the best loss at each N
    l_d: PowerLaw | None = None  # fitted on the best loss at each D
    l_c: PowerLaw | None = None  # fitted on the compute frontier

    def loss(self, n: Any, d: Any) -> Any:
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return np.power(np.power(self.n_c / n, self.alpha_n / self.alpha_d) + self.d_c / d, self.alpha_d)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "alpha_N": self.alpha_n,
            "alpha_D": self.alpha_d,
            "N_c": self.n_c,
            "D_c": self.d_c,
        }
        for name, law in (("L_N", self.l_n), ("L_D", self.l_d), ("L_C", self.l_c)):
            if law is not None:
                out[name] = {"exponent": law.exponent, "scale": law.scale}
        return out


def fit_power_law(x: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray) -> PowerLaw:
    """Least squares on log L = α·log X_c − α·log X."""
    lx, ll = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(loss, dtype=np.float64))
    if len(np.unique(lx)) < 2:
        raise ScalingError(f"power law needs >= 2 distinct x values, got {len(np.unique(lx))}")
    slope, intercept = np.polyfit(lx, ll, 1)
    alpha = -slope
    if alpha <= 0:
        raise ScalingError(f"power law: loss does not fall with x (fitted exponent {alpha:.4g})")
    return PowerLaw(exponent=float(alpha), scale=float(math.exp(intercept / alpha)))


def _best_per(key: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lowest loss for each distinct key (rounded to 0.1% so float noise does not split groups)."""
    groups: dict[float, float] = {}
    for k, v in zip(key, loss):
        r = round(math.log(k), 3)
        groups[r] = min(groups.get(r, math.inf), v)
    ks = np.array(sorted(groups))
    return np.exp(ks), np.array([groups[k] for k in ks])


def compute_frontier(points: Sequence[RunPoint]) -> list[RunPoint]:
    """Points whose loss is lower than every point of smaller compute (Kaplan's L(C_min) envelope)."""
    out, best = [], math.inf
    for p in sorted(points, key=lambda q: q.C):
        if p.loss < best:
            out.append(p)
            best = p.loss
    return out


def fit_kaplan(points: Sequence[RunPoint]) -> KaplanLaw:
    """Joint L(N, D) by least squares on log-loss from several starts (scipy least_squares, soft-L1),
    plus the 1-D power laws where the data allow them (each needs >= 2 distinct values)."""
    from scipy.optimize import least_squares

    if len(points) < 4:
        raise ScalingError(f"Kaplan joint form has 4 parameters; got {len(points)} point(s), need >= 4")
    n, d, loss = _arrays(points)
    ln, ld, ll = np.log(n), np.log(d), np.log(loss)

    def resid(theta: np.ndarray) -> np.ndarray:
        a_n, a_d, lnc, ldc = theta
        # log[(Nc/N)^(aN/aD) + Dc/D] via logaddexp, stable for any magnitude.
        inner = np.logaddexp((a_n / a_d) * (lnc - ln), ldc - ld)
        return a_d * inner - ll

    best = None
    with _one_blas_thread():
        for a_n in (0.05, 0.1, 0.3):
            for a_d in (0.05, 0.1, 0.3):
                for lnc in (math.log(1e10), math.log(1e14), math.log(1e18)):
                    for ldc in (math.log(1e10), math.log(1e14), math.log(1e18)):
                        res = least_squares(
                            resid,
                            np.array([a_n, a_d, lnc, ldc]),
                            bounds=([1e-4, 1e-4, -50, -50], [5, 5, 150, 150]),
                            loss="soft_l1",
                            f_scale=1e-2,
                        )
                        if best is None or res.cost < best.cost:
                            best = res
    assert best is not None
    a_n, a_d, lnc, ldc = best.x

    def maybe(fn: Callable[[], PowerLaw]) -> PowerLaw | None:
        try:
            return fn()
        except ScalingError:
            return None

    frontier = compute_frontier(points)
    return KaplanLaw(
        alpha_n=float(a_n),
        alpha_d=float(a_d),
        n_c=float(math.exp(lnc)),
        d_c=float(math.exp(ldc)),
        l_n=maybe(lambda: fit_power_law(*_best_per(n, loss))),
        l_d=maybe(lambda: fit_power_law(*_best_per(d, loss))),
        l_c=maybe(lambda: fit_power_law([p.C for p in frontier], [p.loss for p in frontier])),
    )


# ----------------------------------------------------------------------------- fit reports


@dataclass
class FitReport:
    form: Literal["chinchilla", "kaplan"]
    params: dict[str, Any]
    num_points: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95% bootstrap intervals
    objective: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "form": self.form,
            **self.params,
            "num_points": self.num_points,
            "ci95": {k: list(v) for k, v in self.ci.items()},
            "objective": self.objective,
            "warnings": self.warnings,
        }


def bootstrap_chinchilla(
    points: Sequence[RunPoint], law: ChinchillaLaw, *, samples: int = 100, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals from refits on points resampled with replacement (each refit starts
    from the full-data optimum, the usual warm start for bootstrap refits)."""
    rng = np.random.default_rng(seed)
    # max(): a degenerate fit can underflow E (or A, B) to 0.0; log of the smallest float keeps it a start.
    x_full = np.array([math.log(max(v, 1e-300)) for v in (law.A, law.B, law.E)] + [law.alpha, law.beta])
    draws: dict[str, list[float]] = {k: [] for k in law.params()}
    for _ in range(samples):
        idx = rng.integers(0, len(points), len(points))
        sample = [points[i] for i in idx]
        if len({(p.N, p.D) for p in sample}) < 5:
            continue
        refit, _ = fit_chinchilla(sample, starts=0, extra_starts=[x_full])
        for k, v in refit.params().items():
            draws[k].append(v)
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items() if v}


def bootstrap_kaplan(
    points: Sequence[RunPoint], *, samples: int = 50, seed: int = 0
) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"alpha_N": [], "alpha_D": [], "N_c": [], "D_c": []}
    for _ in range(samples):
        sample = [points[i] for i in rng.integers(0, len(points), len(points))]
        if len({(p.N, p.D) for p in sample}) < 4:
            continue
        law = fit_kaplan(sample)
        for k, v in (("alpha_N", law.alpha_n), ("alpha_D", law.alpha_d), ("N_c", law.n_c), ("D_c", law.d_c)):
            draws[k].append(v)
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items() if v}


def fit(
    points: Sequence[RunPoint],
    *,
    form: Literal["chinchilla", "kaplan"] = "chinchilla",
    bootstrap: int = 0,
    seed: int = 0,
) -> tuple[FitReport, ChinchillaLaw | KaplanLaw]:
    if form == "chinchilla":
        law, obj = fit_chinchilla(points)
        ci = bootstrap_chinchilla(points, law, samples=bootstrap, seed=seed) if bootstrap else {}
        warn = fit_warnings(points, law)
        return FitReport("chinchilla", law.params(), len(points), ci, obj, warn), law
    if form == "kaplan":
        klaw = fit_kaplan(points)
        ci = bootstrap_kaplan(points, samples=bootstrap, seed=seed) if bootstrap else {}
        return FitReport("kaplan", klaw.params(), len(points), ci, None, fit_warnings(points, klaw)), klaw
    raise ScalingError(f"form={form!r}: must be 'chinchilla' or 'kaplan'")


def load_law(path: str | Path) -> ChinchillaLaw:
    """A Chinchilla law from the JSON `scaling fit` writes (or any JSON with E, A, B, alpha, beta)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScalingError(f"--fit {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ScalingError(f"--fit {path}: not JSON ({exc.msg})") from None
    missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in data]
    if missing:
        form = data.get("form", "?")
        raise ScalingError(
            f"--fit {path}: form={form!r} lacks {', '.join(missing)}; compute-optimal planning needs a "
            "Chinchilla-form fit (scaling fit --form chinchilla)"
        )
    return ChinchillaLaw(**{k: float(data[k]) for k in ("E", "A", "B", "alpha", "beta")})


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class BudgetPlan:
    flops: float
    N: float
    D: float
    tokens_per_param: float
    loss: float
    nearest_preset: str | None = None
    nearest_preset_params: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def preset_param_counts(*, vocab_size: int = 50257) -> dict[str, int]:
    """Tandem's N of every decoder-only (family gpt) configs/models/*.yaml, vocabulary set to `vocab_size`."""
    from pretrain.config import CONFIG_DIR, load_config

    counts = {}
    for path in sorted((CONFIG_DIR / "models").glob("*.yaml")):
        cfg = load_config(
            None, [f"model.preset={path.stem}", f"model.vocab_size={vocab_size}"], validate=False
        )
        if cfg.model.family == "gpt":
            counts[path.stem] = non_embedding_params_of(cfg.model)
    return counts


def nearest_preset(n: float, counts: dict[str, int]) -> tuple[str, int]:
    name = min(counts, key=lambda k: abs(math.log(counts[k] / n)))
    return name, counts[name]


def plan_budget(flops: float, law: ChinchillaLaw, *, presets: dict[str, int] | None = None) -> BudgetPlan:
    n, d = law.optimal(flops)
    near = nearest_preset(n, presets) if presets else (None, None)
    return BudgetPlan(
        flops=flops,
        N=n,
        D=d,
        tokens_per_param=d / n,
        loss=float(law.loss(n, d)),
        nearest_preset=near[0],
        nearest_preset_params=near[1],
    )


# ----------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    num_heads: int

    @property
    def name(self) -> str:
        return f"L{self.num_layers}-H{self.hidden_size}"


def gpt_params(shape: Shape, *, vocab_size: int) -> int:
    """Tandem's N for a GELU GPT with biases (12h² + 13h per block, final norm 2h, LM head h·V)."""
    h = shape.hidden_size
    return shape.num_layers * (12 * h * h + 13 * h) + 2 * h + h * vocab_size


_SHAPE_RE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")


def parse_shape(text: str) -> Shape:
    """'LAYERSxHIDDEN[xHEADS]' (heads default to hidden/64, at least 1) or a configs/models preset name."""
    m = _SHAPE_RE.match(text.strip())
    if m:
        layers, hidden = int(m.group(1)), int(m.group(2))
        heads = int(m.group(3)) if m.group(3) else max(1, hidden // 64)
        if hidden % heads:
            raise ScalingError(f"size {text!r}: hidden {hidden} is not divisible by heads {heads}")
        return Shape(layers, hidden, heads)
    from pretrain.config import load_config

    try:
        cfg = load_config(None, [f"model.preset={text.strip()}"], validate=False).model
    except Exception as exc:
        raise ScalingError(
            f"size {text!r}: not LAYERSxHIDDEN[xHEADS] and not a model preset ({exc})"
        ) from None
    return Shape(cfg.num_layers, cfg.hidden_size, cfg.num_heads)


def shape_for_params(target: float, *, vocab_size: int, aspect: float = 64.0) -> Shape:
    """The GPT shape with hidden/layers ≈ `aspect` (GPT-3 Small's 768/12) whose N is closest to target."""
    best: tuple[float, Shape] | None = None
    for hidden in range(32, 16385, 32):
        layers = max(1, round(hidden / aspect))
        heads = hidden // 64 if hidden % 64 == 0 else hidden // 32  # head dim 64, or 32 off the grid
        shape = Shape(layers, hidden, heads)
        err = abs(math.log(gpt_params(shape, vocab_size=vocab_size) / target))
        if best is None or err < best[0]:
            best = (err, shape)
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class SweepEntry:
    index: int
    name: str
    config: str
    flops: float
    N: int
    D: int
    steps: int


def generate_sweep(
    budgets: Sequence[float],
    out_dir: str | Path,
    *,
    base_config: str | Path,
    sizes: Sequence[Shape] | None = None,
    per_budget: int = 5,
    spread: float = 4.0,
    law: ChinchillaLaw | None = None,
    vocab_size: int | None = None,
    overrides: Sequence[str] = (),
    min_steps: int = 10,
) -> list[SweepEntry]:
    """IsoFLOP profiles (Hoffmann et al. 2022, Approach 2): for each budget C and model size N, a run of
    D = C/(6N) tokens. `sizes` fixes the shapes; otherwise `per_budget` shapes spaced geometrically over
    [N_opt/spread, N_opt·spread] around the law's optimum. Writes OUT/configs/*.yaml (each validated by
    load_config), OUT/sweep.csv and OUT/sweep.sbatch (a Slurm array, also runnable with plain bash)."""
    from pretrain.config import ConfigError, load_config, save_config

    out_dir = Path(out_dir)
    law = law or PRESETS[DEFAULT_PRESET]
    base = load_config(base_config, list(overrides), validate=False)
    vocab = vocab_size or base.model.vocab_size
    if vocab <= 0:
        raise ScalingError(
            f"model.vocab_size={base.model.vocab_size}: set it in the base config or pass --vocab-size "
            "(N includes the LM head, so the sweep needs the vocabulary size)"
        )
    tokens_per_step = base.train.global_batch_size * base.data.seq_len
    entries: list[SweepEntry] = []
    problems: list[str] = []
    for flops in budgets:
        if flops <= 0:
            raise ScalingError(f"--flops {flops}: every budget must be > 0")
        if sizes:
            shapes = list(sizes)
        else:
            n_opt, _ = law.optimal(flops)
            targets = np.geomspace(n_opt / spread, n_opt * spread, per_budget)
            shapes = list(dict.fromkeys(shape_for_params(t, vocab_size=vocab) for t in targets))
        for shape in shapes:
            n = gpt_params(shape, vocab_size=vocab)
            steps = max(min_steps, round(flops / (6.0 * n) / tokens_per_step))
            d = steps * tokens_per_step
            name = f"C{flops:.1e}-{shape.name}".replace("+", "")
            cfg_path = out_dir / "configs" / f"{name}.yaml"
            run_overrides = [
                *overrides,
                "model.preset=null",
                f"model.num_layers={shape.num_layers}",
                f"model.hidden_size={shape.hidden_size}",
                f"model.num_heads={shape.num_heads}",
                f"model.vocab_size={vocab}",
                f"model.max_seq_len={max(base.model.max_seq_len, base.data.seq_len)}",
                f"train.steps={steps}",
                f"train.out_dir={out_dir / 'runs' / name}",
                f"optimizer.warmup_steps={min(base.optimizer.warmup_steps, steps // 10)}",
                "optimizer.decay_steps=0",
            ]
            try:
                cfg = load_config(base_config, run_overrides)
            except ConfigError as exc:
                problems += [f"{name}: {p}" for p in exc.problems]
                continue
            if cfg.model.activation != "gelu" or not cfg.model.bias or cfg.model.ffn_hidden_size:
                raise ScalingError(
                    "sweep sizes assume GPT-2-style blocks (model.activation=gelu, model.bias=true, default "
                    f"ffn); the base config has activation={cfg.model.activation!r}, bias={cfg.model.bias}"
                )
            save_config(cfg, cfg_path)
            entries.append(SweepEntry(len(entries), name, str(cfg_path), flops, n, d, steps))
    if problems:
        raise ConfigError(problems, "scaling sweep")
    _write_sweep_index(entries, out_dir)
    return entries


def _write_sweep_index(entries: Sequence[SweepEntry], out_dir: Path) -> None:
    with open(out_dir / "sweep.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "name", "config", "flops", "N", "D", "steps"])
        for e in entries:
            w.writerow([e.index, e.name, e.config, e.flops, e.N, e.D, e.steps])
    configs = "\n".join(f'  "{Path(e.config).resolve()}"' for e in entries)
    script = f"""#!/bin/bash
# IsoFLOP sweep written by `pretrain scaling sweep`: {len(entries)} runs, one per array index.
#   sbatch {out_dir / "sweep.sbatch"}          # on a Slurm cluster: one job per config
#   bash {out_dir / "sweep.sbatch"}            # anywhere else: every config in turn
# Then: pretrain scaling fit --runs {out_dir / "runs"} --out {out_dir / "fit"}
#SBATCH --job-name=tandem-isoflop
#SBATCH --array=0-{len(entries) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --output={out_dir.resolve() / "logs"}/%A_%a.out
set -euo pipefail
CONFIGS=(
{configs}
)
mkdir -p "{out_dir.resolve() / "logs"}"
if [[ -n "${{SLURM_ARRAY_TASK_ID:-}}" ]]; then
  srun pretrain train --config "${{CONFIGS[$SLURM_ARRAY_TASK_ID]}}"
else
  for cfg in "${{CONFIGS[@]}}"; do pretrain train --config "$cfg"; done
fi
"""
    path = out_dir / "sweep.sbatch"
    path.write_text(script, encoding="utf-8")
    path.chmod(0o755)


def fit_warnings(points: Sequence[RunPoint], law: ChinchillaLaw | KaplanLaw) -> list[str]:
    """Reasons not to trust a fit: IsoFLOP profiles without an interior minimum (the optimum is then an
    extrapolation) and Chinchilla constants at degenerate values."""
    out = []
    for group in _budget_groups(points):
        c = float(np.exp(np.mean([math.log(p.C) for p in group])))
        if len(group) < 3:
            out.append(
                f"IsoFLOP profile at C≈{c:.2g}: {len(group)} point(s); at least 3 are needed to see a minimum"
            )
            continue
        ns = sorted(p.N for p in group)
        best = min(group, key=lambda p: p.loss).N
        if best in (ns[0], ns[-1]):
            end, way = ("smallest", "down") if best == ns[0] else ("largest", "up")
            out.append(
                f"IsoFLOP profile at C≈{c:.2g}: lowest loss at the {end} N ({best:.3g}), no interior minimum; "
                f"the fitted optimum there is an extrapolation (extend the sizes {way} or change the budget)"
            )
    if isinstance(law, ChinchillaLaw):
        if law.E < 1e-3:
            out.append(f"E={law.E:.3g}: the irreducible loss collapsed to 0, the data do not constrain it")
        for name, value in (("alpha", law.alpha), ("beta", law.beta)):
            if not 0.05 <= value <= 1.5:
                out.append(f"{name}={value:.3g}: far outside published fits (0.2-0.8); the fit is degenerate")
    return out


# ----------------------------------------------------------------------------- plots


def _budget_groups(points: Sequence[RunPoint], tol: float = 0.05) -> list[list[RunPoint]]:
    """Points split into IsoFLOP groups: sorted by log10 C, a new group where the gap exceeds `tol`."""
    groups: list[list[RunPoint]] = []
    last = None
    for p in sorted(points, key=lambda q: q.C):
        lc = math.log10(p.C)
        if last is None or lc - last > tol:
            groups.append([])
        groups[-1].append(p)
        last = lc
    return groups


def plot_fit(
    points: Sequence[RunPoint],
    law: ChinchillaLaw | KaplanLaw,
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Left: loss against N for each IsoFLOP group, with the fitted L(N, C/6N). Right: fitted iso-loss
    contours over (N, D), iso-FLOP lines C = 6ND, the points, and (Chinchilla form) the optimal frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    groups = _budget_groups(points)
    cmap = plt.get_cmap("viridis")
    n_all, d_all, _ = _arrays(points)
    for i, group in enumerate(groups):
        color = cmap(i / max(1, len(groups) - 1))
        c = float(np.exp(np.mean([math.log(p.C) for p in group])))
        ax1.scatter([p.N for p in group], [p.loss for p in group], color=color, s=18, label=f"C={c:.2g}")
        ns = np.geomspace(min(p.N for p in group) / 1.5, max(p.N for p in group) * 1.5, 100)
        ax1.plot(ns, law.loss(ns, c / (6 * ns)), color=color, lw=1)
        if isinstance(law, ChinchillaLaw):
            n_opt, d_opt = law.optimal(c)
            ax1.plot([n_opt], [law.loss(n_opt, d_opt)], marker="*", color=color, ms=10)
    ax1.set_xscale("log")
    ax1.set_xlabel("N (non-embedding parameters)")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title("IsoFLOP profiles: points and fitted L(N, C/6N)")
    if len(groups) <= 12:
        ax1.legend(fontsize=7)

    nn_ = np.geomspace(n_all.min() / 3, n_all.max() * 3, 200)
    dd = np.geomspace(d_all.min() / 3, d_all.max() * 3, 200)
    gn, gd = np.meshgrid(nn_, dd)
    z = law.loss(gn, gd)
    cs = ax2.contour(gn, gd, z, levels=12, cmap="magma", linewidths=0.8)
    ax2.clabel(cs, fontsize=6, fmt="%.2f")
    for group in groups:
        c = float(np.exp(np.mean([math.log(p.C) for p in group])))
        ax2.plot(nn_, c / (6 * nn_), color="0.6", lw=0.7, ls="--")
    ax2.scatter(n_all, d_all, c=[p.loss for p in points], cmap="magma", s=18, edgecolor="k", lw=0.3)
    if isinstance(law, ChinchillaLaw):
        cs_ = np.geomspace(6 * nn_.min() * dd.min(), 6 * nn_.max() * dd.max(), 50)
        opt = np.array([law.optimal(float(c)) for c in cs_])
        ax2.plot(opt[:, 0], opt[:, 1], color="tab:blue", lw=1.5, label="compute-optimal N, D")
        ax2.legend(fontsize=7, loc="upper right")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlim(nn_.min(), nn_.max())
    ax2.set_ylim(dd.min(), dd.max())
    ax2.set_xlabel("N (non-embedding parameters)")
    ax2.set_ylabel("D (tokens)")
    ax2.set_title("fitted iso-loss contours, iso-FLOP lines (dashed)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- synthetic data


def synthetic_isoflop(
    law: Callable[[Any, Any], Any],
    budgets: Sequence[float],
    n_centers: Sequence[float],
    *,
    per_budget: int = 9,
    spread: float = 8.0,
    noise: float = 0.005,
    seed: int = 0,
) -> list[RunPoint]:
    """IsoFLOP-style points: for each budget, `per_budget` sizes over [center/spread, center·spread],
    D = C/(6N), loss = law(N, D) × (1 + noise·ε), ε ~ N(0, 1). For tests and the docs plot."""
    rng = np.random.default_rng(seed)
    points = []
    for c, center in zip(budgets, n_centers):
        for n in np.geomspace(center / spread, center * spread, per_budget):
            d = c / (6.0 * n)
            loss = float(law(np.float64(n), np.float64(d))) * (1.0 + noise * rng.standard_normal())
            points.append(RunPoint(N=float(n), D=float(d), loss=loss, C=float(c), source="synthetic"))
    return points
