"""Bayesian Model Merging, outer level: the prior strength lambda per module (or per block of layers, or
one for the whole model) chosen by Bayesian optimisation (optuna) against a user's evaluation function.

    problem = BMMProblem(load_config("bmm.yml"), device="cuda")   # reads the checkpoints once
    result = tune_bmm(problem, evaluate, n_trials=40, timeout=600, granularity="block")
    merge(parse_config(result.config), "out/")                    # the tuned merge, as a plain config

`evaluate(state)` receives the merged model as {tensor name: tensor} (checkpoint names, on the
problem's device: views of problem.session.model's own tensors, so an evaluation can run that model) and
returns a score to maximise (e.g. validation accuracy).

BMMProblem is a MergeSession (merge_engine/session.py) with a faster path for lambda: the session reads
every tensor once and merges the config exactly (the anchor's output where no regression applies); the
problem then factorises each layer's summed Gram S = Q diag(e) Q^T (eigh, float64)
once. Then for any lambda
    W*(lambda) = (R + lambda A)(S + lambda I)^-1 = ((R Q + lambda A Q) diag(1 / (e + lambda))) Q^T,
with R = sum_t W_t G_t and A the anchor; Q, e, R Q and A Q stay on the device (about three fp32 copies
of each linear weight plus its Gram factor), so a trial is one [out, d] x [d, d] product per layer.
The search is over log(lambda) in lambda_range; the config's own lambda is evaluated first, so the
result never scores below it on the evaluation set. Sampler: optuna's Gaussian-process sampler for up
to `gp_max_dims` lambdas, its multivariate TPE beyond (a GP over hundreds of dimensions is slow and
no better).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from merge_engine.config import MergeConfig, parse_config
from merge_engine.engine import tensor_group
from merge_engine.errors import ConfigError
from merge_engine.extras import optuna_log_level, require, require_isolated
from merge_engine.io.checkpoint import split_layer_name
from merge_engine.io.untrusted import is_int
from merge_engine.methods.regression import bmm_terms
from merge_engine.progress import progress_bar
from merge_engine.session import MergeSession

log = logging.getLogger("merge_engine")

GRANULARITIES = ("model", "block", "module")


@dataclass
class LayerSystem:
    """One linear weight's BMM system, factorised: W*(lam) = ((rq + lam aq) / (e + lam)) q^T."""

    q: torch.Tensor  # [d, d] eigenvectors of S
    e: torch.Tensor  # [d] eigenvalues of S (clamped at 0)
    rq: torch.Tensor  # [out, d]  R Q
    aq: torch.Tensor  # [out, d]  A Q
    transposed: bool
    dtype: torch.dtype  # the output tensor's

    def solve(self, lam: float) -> torch.Tensor:
        denominator = self.e + lam
        # a direction with no data and no prior (lambda 0 on a singular Gram): its numerator is the stored
        # factors' rounding, not signal, so it gets nothing (a pseudo-inverse; the engine's jitter gives ~0)
        cutoff = self.e.shape[0] * torch.finfo(self.e.dtype).eps * float(self.e.max())
        scaled = torch.where(denominator > cutoff, (self.rq + self.aq * lam) / denominator, 0)
        merged = scaled @ self.q.T
        return (merged.T if self.transposed else merged).to(self.dtype)


def factorise(weights: list[torch.Tensor], grams: list[torch.Tensor], anchor: torch.Tensor, transposed: bool,
              out_dtype: torch.dtype, store: torch.dtype) -> LayerSystem:
    s = sum(g.double() for g in grams)
    r = sum(w.double() @ g.double() for w, g in zip(weights, grams))
    e, q = torch.linalg.eigh(s)
    a = anchor.T if transposed else anchor
    return LayerSystem(q.to(store), e.clamp_min(0).to(store), (r @ q).to(store), (a.double() @ q).to(store),
                       transposed, out_dtype)


class BMMProblem:
    """A bmm config's session (every tensor read once, merged into a live model) and each regressed linear
    weight's factorised system, on `device`; merged(lambdas) writes the systems' solves into the live model."""

    def __init__(self, config: MergeConfig | dict | MergeSession, device: str = "auto",
                 store: torch.dtype = torch.float32, progress: bool = True):
        self.session = config if isinstance(config, MergeSession) else None
        self.config = self.session.config if self.session else (
            config if isinstance(config, MergeConfig) else parse_config(config))
        if self.config.method.name != "bmm":
            raise ConfigError([f"tuning needs merge_method: bmm, got '{self.config.method.name}'"])
        self.session = self.session or MergeSession(self.config, device, progress=progress)
        self.device = self.session.device
        self.systems: dict[str, LayerSystem] = {}
        self.default_lambda: dict[str, float] = {}
        for job, tensors in progress_bar(self.session.job_inputs(), desc="factorising", unit="tensor",
                                         disable=not progress):
            if job.copy_only:
                continue
            terms = bmm_terms(tensor_group(job, tensors), self.config.method.wrapped)
            if terms.weights is not None:
                self.systems[job.out_name] = factorise(terms.weights, terms.grams, terms.prior, terms.transposed,
                                                       job.out_dtype, store)
                self.default_lambda[job.out_name] = job.shared["lambda"]
        if not self.systems:
            raise ConfigError(["no linear weight has Grams for every expert: nothing for lambda to tune"])

    def merged(self, lambdas: dict[str, float]) -> dict[str, torch.Tensor]:
        """The merged model for a lambda per regressed tensor (tensors not named keep the config's), written into
        the session's live model; its tensors by name."""
        state = self.session.state_dict()
        self.session.changed_outside(self.systems)  # no longer the merge of the session's config
        with torch.no_grad():
            for name, system in self.systems.items():
                state[name].copy_(system.solve(lambdas.get(name, self.default_lambda[name])))
            self.session.cast_into_model(self.systems)
        return state

    def groups(self, granularity: str) -> dict[str, list[str]]:
        """Regressed tensor names by the lambda they share: one for the model, one per layer (of each layer stack:
        a vision tower's block 0 is not the language model's layer 0), or one each."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        stacks = {layer[0] for layer in map(split_layer_name, self.systems) if layer}
        out: dict[str, list[str]] = {}
        for name in self.systems:
            if granularity == "model":
                key = "model"
            elif granularity == "block" and (layer := split_layer_name(name)):
                key = f"layer {layer[1]}" if len(stacks) == 1 else f"{layer[0]}.{layer[1]}"
            else:
                key = name
            out.setdefault(key, []).append(name)
        return out


@dataclass
class TuneResult:
    lambdas: dict[str, float]  # per regressed tensor
    group_lambdas: dict[str, float]  # per tuned group ({} where the config's own lambdas scored best)
    score: float
    default_score: float  # the config's own lambdas (evaluated first: score is never below it)
    trials: int
    seconds: float
    config: dict = field(repr=False)  # the input config with the tuned lambdas as per-tensor filters (or as given)
    study: object = field(default=None, repr=False)


def tuned_config(raw: dict, lambdas: dict[str, float], default: float) -> dict:
    """The config with `lambda` set per tensor: full tensor names as filters, the old value for the rest. A slice's
    or a module's own `lambda` would outrank these global ones, so it is removed (lambda acts only on the
    regressed tensors, all named here)."""
    out = copy.deepcopy(raw)
    modules = list((out.get("modules") or {}).values())
    for scope in [*(out.get("slices") or []), *modules, *(s for m in modules for s in m.get("slices") or [])]:
        if isinstance(scope.get("parameters"), dict):
            scope["parameters"].pop("lambda", None)
    out.setdefault("parameters", {})
    out["parameters"]["lambda"] = [{"filter": name, "value": lam} for name, lam in lambdas.items()] + [{"value": default}]
    return out


def tune_bmm(problem: BMMProblem, evaluate: Callable[[dict[str, torch.Tensor]], float], n_trials: int = 30,
             timeout: float | None = None, granularity: str = "block", lambda_range: tuple[float, float] = (1e-3, 1e3),
             seed: int = 0, gp_max_dims: int = 16, progress: bool = True) -> TuneResult:
    """Maximise evaluate(merged state) over per-group lambdas, within n_trials and timeout seconds."""
    optuna = require_isolated("optuna", "tune", "BMM's lambda tuning")
    require("scipy", "tune", "BMM's lambda tuning")  # optuna's GP sampler imports it only when it first samples
    lo, hi = lambda_range
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"lambda_range must satisfy 0 < low < high < inf, got {lambda_range}")
    if not is_int(n_trials) or n_trials < 1:
        raise ValueError(f"n_trials must be an integer of at least 1, got {n_trials!r}")
    if timeout is not None and not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a number of seconds above 0 (or None), got {timeout!r}")
    groups = problem.groups(granularity)
    sampler = (optuna.samplers.GPSampler(seed=seed) if len(groups) <= gp_max_dims
               else optuna.samplers.TPESampler(seed=seed, multivariate=True))
    began = time.perf_counter()
    # the config's own merge first (its lambdas per tensor, filters and values outside lambda_range included),
    # so that the result never scores below it
    default_score = float(evaluate(problem.merged({})))
    with optuna_log_level(optuna, None if progress else optuna.logging.WARNING):  # process-wide: restored after
        study = optuna.create_study(direction="maximize", sampler=sampler)

        def per_tensor(group_lambdas: dict[str, float]) -> dict[str, float]:
            return {name: group_lambdas[g] for g, names in groups.items() for name in names}

        def objective(trial) -> float:
            chosen = {g: trial.suggest_float(g, lo, hi, log=True) for g in groups}
            return float(evaluate(problem.merged(per_tensor(chosen))))

        own = set(problem.default_lambda.values())
        start = next(iter(problem.default_lambda.values()))  # (the only one, where known)
        known = len(own) == 1 and lo <= start <= hi  # one lambda the search space holds
        if known:  # the sampler learns from it as from a trial
            distribution = optuna.distributions.FloatDistribution(lo, hi, log=True)
            study.add_trial(optuna.trial.create_trial(params=dict.fromkeys(groups, start),
                                                      distributions=dict.fromkeys(groups, distribution),
                                                      value=default_score))
        left = None if timeout is None else timeout - (time.perf_counter() - began)
        if n_trials > 1 and (left is None or left > 0):
            study.optimize(objective, n_trials=n_trials - 1, timeout=left, show_progress_bar=False)
        trials = 1 + len(study.trials) - known
        seconds = time.perf_counter() - began
        if len(study.trials) > known and study.best_value > default_score:
            best = study.best_trial.params
            lambdas = per_tensor(best)
            return TuneResult(lambdas, best, study.best_value, default_score, trials, seconds,
                              tuned_config(problem.config.raw, lambdas, start), study)
        return TuneResult(dict(problem.default_lambda), {}, default_score, default_score, trials, seconds,
                          copy.deepcopy(problem.config.raw), study)
