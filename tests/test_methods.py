"""The fusion methods on a tiny real model: closed forms of the data-free baselines, OPCM's invariant and state,
OTMF's composition, optimisation, determinism and reservoir. No engine part is mocked; the family is a small MLP
defined here so these tests depend only on the method interface."""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import InvalidInput
from core.methods import (
    METHODS,
    CommonParams,
    OPCMParams,
    OTMFParams,
    TaskArithmeticParams,
    TiesParams,
    WeightAverageParams,
)
from core.progress import NullProgress
from core.uris import Fetched
from engine.families.base import Family, LoadedBase, Tensors
from engine.inputs import Inputs
from engine.job import EvalTask, StepTask, merge_steps
from engine.methods import get_method
from engine.methods.base import MethodState, StepHeads, StepInput, StepOutput
from engine.methods.opcm import project_out
from engine.methods.otmf import _Heads, _MaskedTower, compose, merge_from_masks
from engine.methods.reservoir import Reservoir
from engine.methods.ties import kept_count, kth_largest_magnitude
from engine.sinkhorn import sinkhorn_divergence

CPU = torch.device("cpu")
IN_DIM = 8


# --- a tiny family -------------------------------------------------------------------------------------------
def tiny_module() -> nn.Module:
    # Linear weights (projected by OPCM), biases and a LayerNorm (the "every other tensor" path).
    return nn.Sequential(
        nn.Linear(IN_DIM, 32), nn.Tanh(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 16)
    )


class TinyFamily(Family):
    """An MLP whose whole state dict is the merged tower; inputs are {"x": float32 [N, 8]}."""

    def load_base(self, base: Fetched, arch: str | dict | None) -> LoadedBase:
        return LoadedBase(tower=load_file(base.path), module=tiny_module())

    def load_checkpoint(self, checkpoint: Fetched, base: LoadedBase, *, field: str) -> Tensors:
        return load_file(checkpoint.path)

    def load_version(self, folder: Path, base: LoadedBase) -> Tensors:
        return load_file(folder / "model.safetensors")

    def save_version(self, base: LoadedBase, tower: Tensors, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tower, folder / "model.safetensors")
        return [folder / "model.safetensors"]

    def features(self, base: LoadedBase, tower: Tensors, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert base.module is not None
        x = batch["x"].to(next(iter(tower.values())).dtype)
        out = torch.func.functional_call(base.module, tower, (x,))  # [B, 16]
        return F.normalize(out.float(), dim=-1)


@dataclass
class World:
    """θ0, task checkpoints θ_t = θ0 + τ_t, and per task a calibration and an eval sample from its own input
    distribution (a Gaussian around a task-specific mean)."""

    family: TinyFamily
    loaded: LoadedBase
    base: Tensors
    tasks: list[Tensors]
    calibration: list[torch.Tensor]  # [96, 8] each
    eval: list[torch.Tensor]  # [128, 8] each


def make_world(n_tasks: int, seed: int = 0) -> World:
    torch.manual_seed(seed)
    module = tiny_module()
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    tasks = [
        {k: v + 0.5 * v.std().clamp_min(0.1) * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for _ in range(n_tasks)
    ]
    means = [torch.randn(IN_DIM, generator=g) for _ in range(n_tasks)]
    calibration = [m + 0.7 * torch.randn(96, IN_DIM, generator=g) for m in means]
    evals = [m + 0.7 * torch.randn(128, IN_DIM, generator=g) for m in means]
    family = TinyFamily("tiny", has_features=True)
    return World(family, LoadedBase(tower=base, module=module), base, tasks, calibration, evals)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(5)


class StepCalls(NullProgress):
    """The job's progress reduced to what a method reports: (step, steps_total, loss, objective) after every
    iteration."""

    def __init__(self, callback: Callable[[int, int, float | None, str | None], None]):
        self.callback = callback

    def update(self, *, step: int, steps_total: int, loss: float | None, objective: str | None = None, **_) -> None:
        self.callback(step, steps_total, loss, objective)


def run(
    name: str,
    world: World,
    params: CommonParams,
    n: int,
    *,
    start: int = 0,
    merged: Tensors | None = None,
    state: MethodState | None = None,
    progress: Callable[[int, int, float | None, str | None], None] | None = None,
) -> list[StepOutput]:
    """n continual steps through the job's own loop (`merge_steps`), from θ0 or from a head that holds `start`
    tasks, each step's state carried to the next; every step's output."""
    outs: list[StepOutput] = []
    tasks = [
        StepTask(f"task{i}", lambda i=i: world.tasks[i], calibration=Inputs({"x": world.calibration[i]}))
        for i in range(start, start + n)
    ]
    merge_steps(
        world.family, world.loaded, get_method(name), params, tasks, position=start, device=CPU,
        merged=world.base if merged is None else merged, state=MethodState() if state is None else state,
        progress=StepCalls(progress or (lambda *a: None)), on_step=lambda i, out: outs.append(out),
    )  # fmt: skip
    return outs


def step(
    name: str,
    world: World,
    merged: Tensors,
    index: int,
    state: MethodState,
    params: CommonParams,
    progress: Callable[[int, int, float | None, str | None], None] | None = None,
) -> StepOutput:
    """One step merging task `index` onto `merged`, a head that holds `index` tasks."""
    return run(name, world, params, 1, start=index, merged=merged, state=state, progress=progress)[0]


def flat(t: Tensors, keys: list[str]) -> np.ndarray:
    """The tower as one float64 vector, in `keys` order."""
    return np.concatenate([t[k].double().numpy().ravel() for k in keys])


def max_abs_diff(t: Tensors, ref: np.ndarray, keys: list[str]) -> float:
    return float(np.abs(flat(t, keys) - ref).max())


def assert_float32_cpu(t: Tensors, like: Tensors) -> None:
    assert t.keys() == like.keys()
    for k, v in t.items():
        assert v.dtype == torch.float32 and v.device.type == "cpu" and v.shape == like[k].shape


def sinkhorn_to_teacher(world: World, tower: Tensors, task: int) -> float:
    """S_ε between the tower's and θ_task's features on the task's eval sample."""
    with torch.no_grad():
        batch = {"x": world.eval[task]}
        student = world.family.features(world.loaded, tower, batch)
        teacher = world.family.features(world.loaded, world.tasks[task], batch)
        return sinkhorn_divergence(student, teacher, 0.05).item()


# --- registry ------------------------------------------------------------------------------------------------
def test_every_registry_entry_builds_its_engine_method():
    for name, entry in METHODS.items():
        method = get_method(name)
        assert method.name == name
        assert method.data_driven == entry.data_driven
    with pytest.raises(InvalidInput) as exc:
        get_method("model_soup")
    assert exc.value.param == "method"


# --- data-free baselines: closed forms over three continual steps ---------------------------------------------
def test_task_arithmetic_is_theta0_plus_lambda_times_the_sum_of_task_vectors(world: World):
    keys = list(world.base)
    theta0 = flat(world.base, keys)
    calls: list[tuple] = []
    outs = run("task_arithmetic", world, TaskArithmeticParams(), 3, progress=lambda *a: calls.append(a))
    for t, out in enumerate(outs, start=1):
        expected = theta0 + 0.3 * sum(flat(world.tasks[i], keys) - theta0 for i in range(t))
        assert max_abs_diff(out.merged, expected, keys) < 1e-6
        assert_float32_cpu(out.merged, world.base)
    assert calls == [(1, 1, None, None)] * 3


def test_weight_average_is_the_mean_of_the_checkpoints(world: World):
    keys = list(world.base)
    outs = run("weight_average", world, WeightAverageParams(), 3)
    for t, out in enumerate(outs, start=1):
        expected = np.mean([flat(world.tasks[i], keys) for i in range(t)], axis=0)
        assert max_abs_diff(out.merged, expected, keys) < 1e-6
        assert_float32_cpu(out.merged, world.base)


def numpy_ties(world: World, n: int, lam: float, top_k: float) -> list[np.ndarray]:
    """Continual TIES written directly on flat float64 vectors: sort for the trim, sign of the sum, agreeing sum."""
    keys = list(world.base)
    theta0 = flat(world.base, keys)
    taus = [flat(world.tasks[i], keys) - theta0 for i in range(n)]

    def trim(v: np.ndarray) -> np.ndarray:
        keep = max(1, math.floor(v.size * top_k / 100 + 1e-9))
        threshold = np.sort(np.abs(v))[::-1][keep - 1]
        return np.where(np.abs(v) >= threshold, v, 0.0)

    theta = theta0 + lam * taus[0]
    out = [theta]
    for tau in taus[1:]:
        a, b = trim(theta - theta0), trim(tau)
        sign = np.sign(a + b)
        delta = np.where(np.sign(a) == sign, a, 0.0) + np.where(np.sign(b) == sign, b, 0.0)
        theta = theta + lam * delta
        out.append(theta)
    return out


@pytest.mark.parametrize("top_k", [20.0, 55.0])
def test_ties_matches_a_direct_implementation(world: World, top_k: float):
    keys = list(world.base)
    outs = run("ties", world, TiesParams(top_k=top_k), 3)
    for out, expected in zip(outs, numpy_ties(world, 3, 0.3, top_k), strict=True):
        assert max_abs_diff(out.merged, expected, keys) < 1e-6
        assert_float32_cpu(out.merged, world.base)
    assert outs[1].metrics["kept_per_vector"] == kept_count(len(flat(world.base, keys)), top_k)


def test_kth_largest_magnitude_is_exact_across_pieces():
    g = torch.Generator().manual_seed(3)
    pieces = [torch.randn(37, 5, generator=g), torch.randn(300, generator=g) * 1e-3, torch.randn(4, 4, 4, generator=g)]
    pieces[1][:20] = 0.0
    pieces[1][20:25] = -0.0
    pieces[0][0, :3] = torch.tensor([1e-40, -1e30, 7.0])  # a subnormal, a huge value
    pieces[2][0] = pieces[0][1, 0]  # ties
    magnitudes = np.sort(np.abs(np.concatenate([p.numpy().ravel() for p in pieces])))[::-1]
    for k in (1, 2, 3, 17, 100, 300, len(magnitudes) - 1, len(magnitudes)):
        assert kth_largest_magnitude(lambda: iter(pieces), k) == magnitudes[k - 1]
    assert kept_count(100, 20.0) == 20 and kept_count(3, 1.0) == 1 and kept_count(7, 100.0) == 7


# --- OPCM ----------------------------------------------------------------------------------------------------
def test_opcm_projection_equals_the_full_svd_form():
    g = torch.Generator().manual_seed(4)
    for m, n in ((12, 7), (6, 10)):
        p, d = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
        u, s, vt = np.linalg.svd(p.double().numpy(), full_matrices=True)  # u [m, m], vt [n, n]
        r = int(np.argmax(np.cumsum(s) / s.sum() > 0.5))
        z = u.T @ d.double().numpy() @ vt.T
        np.fill_diagonal(z, 0.0)
        z[:r, :r] = 0.0
        np.testing.assert_allclose(project_out(p, d, 0.5).double().numpy(), u @ z @ vt, atol=1e-5)
    zero = torch.zeros(5, 3)
    assert torch.equal(project_out(zero, d[:5, :3], 0.5), d[:5, :3])


def test_opcm_keeps_the_mean_task_vector_norm_and_its_state_round_trips(world: World):
    keys = list(world.base)
    theta0 = flat(world.base, keys)
    tau_norms = [float(np.linalg.norm(flat(t, keys) - theta0)) for t in world.tasks]
    outs = run("opcm", world, OPCMParams(), 4)
    for t, out in enumerate(outs, start=1):
        assert out.state.meta["norms"] == pytest.approx(tau_norms[:t], rel=1e-6)
        norm = float(np.linalg.norm(flat(out.merged, keys) - theta0))
        assert norm == pytest.approx(np.mean(tau_norms[:t]), rel=1e-5)
        assert_float32_cpu(out.merged, world.base)
    assert outs[0].state.meta["lambda_prev"] == 1.0
    assert all(o.state.meta["lambda_prev"] > 0 for o in outs) and not outs[2].state.tensors

    # The state as the store keeps it (JSON meta, no tensors) continues exactly like the in-memory one.
    stored = MethodState(meta=json.loads(json.dumps(outs[2].state.meta)))
    again = step("opcm", world, outs[2].merged, 3, stored, OPCMParams())
    assert all(torch.equal(again.merged[k], outs[3].merged[k]) for k in keys)
    assert again.state.meta == outs[3].state.meta


def test_opcm_starts_from_a_head_written_by_another_method(world: World):
    keys = list(world.base)
    theta0 = flat(world.base, keys)
    head = run("task_arithmetic", world, TaskArithmeticParams(), 2)[-1]
    out = step("opcm", world, head.merged, 2, head.state, OPCMParams())
    head_norm = float(np.linalg.norm(flat(head.merged, keys) - theta0))
    tau_norm = float(np.linalg.norm(flat(world.tasks[2], keys) - theta0))
    assert out.metrics["state_initialised_from_head"] is True
    assert out.state.meta["norms"] == pytest.approx([head_norm, head_norm, tau_norm], rel=1e-6)
    assert float(np.linalg.norm(flat(out.merged, keys) - theta0)) == pytest.approx((2 * head_norm + tau_norm) / 3, 1e-5)


# --- Sinkhorn ------------------------------------------------------------------------------------------------
def test_sinkhorn_divergence_is_zero_on_equal_clouds_and_its_gradient_is_the_derivative():
    g = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(16, 6, generator=g), dim=1)
    y = F.normalize(torch.randn(16, 6, generator=g) + 0.5, dim=1)
    assert sinkhorn_divergence(x, x, 0.05).item() == pytest.approx(0.0, abs=1e-6)
    x.requires_grad_(True)
    loss = sinkhorn_divergence(x, y, 0.05)
    assert loss.item() > 0.05
    (grad,) = torch.autograd.grad(loss, x)
    direction = F.normalize(torch.randn(16, 6, generator=g), dim=None)
    h = 1e-3
    with torch.no_grad():
        up, down = sinkhorn_divergence(x + h * direction, y, 0.05), sinkhorn_divergence(x - h * direction, y, 0.05)
        numeric = (up - down) / (2 * h)
    assert (grad * direction).sum().item() == pytest.approx(numeric.item(), rel=0.05, abs=1e-3)


# --- OTMF ----------------------------------------------------------------------------------------------------
def test_otmf_composition_with_unit_masks_is_the_alpha_blend(world: World):
    alpha = 0.8
    head, task = world.tasks[0], world.tasks[1]
    ones = {k: torch.ones_like(v) for k, v in world.base.items()}
    a = {k: alpha * (head[k] - world.base[k]) for k in world.base}
    b = {k: (1 - alpha) * (task[k] - world.base[k]) for k in world.base}
    composed = compose(world.base, a, b, ones, ones, torch.float32)
    merged = merge_from_masks(world.base, head, task, ones, ones, (alpha, 1 - alpha))
    implicit = merge_from_masks(world.base, head, task, None, None, (alpha, 1 - alpha))  # None: all-ones, not allocated
    for k, theta0 in world.base.items():
        expected = theta0 + alpha * (head[k] - theta0) + (1 - alpha) * (task[k] - theta0)
        torch.testing.assert_close(composed[k], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged[k], expected, rtol=0, atol=1e-6)
        assert torch.equal(implicit[k], merged[k])


def test_otmf_first_step_is_the_first_checkpoint_in_the_convex_blend(world: World):
    calls: list[tuple] = []
    params = OTMFParams(reservoir_per_task=10, composition="convex")
    out = step("otmf", world, world.base, 0, MethodState(), params, lambda *a: calls.append(a))
    assert all(torch.equal(out.merged[k], world.tasks[0][k]) for k in world.base)
    assert calls == [(1, 1, None, None)] and out.metrics["iterations"] == 0
    assert out.state.tensors["reservoir.task_index"].tolist() == [0] * 10


def test_otmf_additive_composition_is_task_arithmetic_at_unit_masks_and_trains_from_there(world: World):
    params = OTMFParams(composition="additive", steps=20, eval_every=5, pre_data="current")
    otmf = run("otmf", world, params, 2)
    ta = run("task_arithmetic", world, TaskArithmeticParams(scaling_factor=params.scaling_factor), 2)
    assert params.scales(0.5) == (1.0, 0.3)
    for k in world.base:  # the first version is θ0 + λ·τ_1, as task arithmetic's
        torch.testing.assert_close(otmf[0].merged[k], ta[0].merged[k], rtol=0, atol=1e-6)
    unit = merge_from_masks(world.base, otmf[0].merged, world.tasks[1], None, None, params.scales(0.5))
    for k in world.base:  # all-ones masks: task arithmetic's sum
        torch.testing.assert_close(unit[k], ta[1].merged[k], rtol=0, atol=1e-6)
    m = otmf[1].metrics
    assert m["scales"] == [1.0, 0.3] and "alpha" not in m and m["best_iteration"] > 0
    assert m["loss_best"] < m["loss_initial"]
    assert any(not torch.allclose(otmf[1].merged[k], unit[k]) for k in world.base)
    with pytest.raises(ValueError, match="additive"):
        OTMFParams(composition="additive", alpha="auto")


@pytest.mark.parametrize("mask_update", ["joint", "alternate"])
def test_otmf_forward_chunks_give_the_whole_batch_result(world: World, monkeypatch, mask_update: str):
    """With `forward_chunk` every forward of a training batch takes at most that many inputs, and the step trains
    the masks it would train on the whole batch (the same losses, and merged weights to float32 rounding)."""
    params = OTMFParams(steps=8, eval_every=4, batch_size=8, mask_update=mask_update)
    whole = run("otmf", world, params, 2)
    sizes: list[int] = []
    features = TinyFamily.features

    def recorded(self, base, tower, batch):
        if torch.is_grad_enabled():
            sizes.append(batch["x"].shape[0])
        return features(self, base, tower, batch)

    monkeypatch.setattr(TinyFamily, "features", recorded)
    chunked = run("otmf", world, params.model_copy(update={"forward_chunk": 3}), 2)
    assert sizes and max(sizes) == 3 and set(sizes) == {3, 2}  # batches of 8 in chunks of 3, 3 and 2
    for k in world.base:
        torch.testing.assert_close(chunked[1].merged[k], whole[1].merged[k], rtol=1e-4, atol=1e-5)
    for key in ("loss_initial", "loss_final", "loss_best"):
        assert chunked[1].metrics[key] == pytest.approx(whole[1].metrics[key], rel=1e-4)


TWO_TASK = OTMFParams(alpha=0.5, steps=60, seed=0, mask_update="alternate")  # the paper's scheme, side by side


@dataclass
class OTMFRun:
    first: StepOutput
    second: StepOutput
    progress: list[tuple[int, int, float | None, str | None]]


@pytest.fixture(scope="module")
def two_task(world: World) -> OTMFRun:
    first = step("otmf", world, world.base, 0, MethodState(), TWO_TASK)
    progress: list[tuple[int, int, float | None, str | None]] = []
    second = step("otmf", world, first.merged, 1, first.state, TWO_TASK, lambda *a: progress.append(a))
    return OTMFRun(first, second, progress)


def test_otmf_loss_falls_during_a_step(two_task: OTMFRun):
    m = two_task.second.metrics
    print("OTMF held-out loss:", {k: round(m[k], 4) for k in ("loss_initial", "loss_best", "loss_final")})
    assert m["pre_data"] == "reservoir" and "pre_data_fallback" not in m
    assert m["iterations"] == 60 and m["loss_best"] <= m["loss_final"]
    assert m["loss_best"] < 0.7 * m["loss_initial"]
    assert [p[:2] for p in two_task.progress] == [(s, 60) for s in range(1, 61)]
    losses = [p[2] for p in two_task.progress]
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
    pre, post = losses[0::2], losses[1::2]  # each side against its own teacher
    assert [p[3] for p in two_task.progress] == ["pre", "post"] * 30  # each loss names its objective
    assert np.mean(pre[-5:]) < np.mean(pre[:5]) or np.mean(post[-5:]) < np.mean(post[:5])
    assert np.mean(pre[-5:]) + np.mean(post[-5:]) < np.mean(pre[:5]) + np.mean(post[:5])
    assert_float32_cpu(two_task.second.merged, two_task.first.merged)


def test_otmf_masks_bring_the_merge_closer_to_both_teachers_than_the_alpha_blend(world: World, two_task: OTMFRun):
    # The α-blend is what OTMF returns when its masks stay all ones: training must beat it on unseen inputs of both
    # tasks, by a margin (a disabled mask trainer, or a zero loss, gives exactly the blend and fails here).
    blend = merge_from_masks(world.base, two_task.first.merged, world.tasks[1], None, None,
                             TWO_TASK.scales(TWO_TASK.alpha))
    ta = run("task_arithmetic", world, TaskArithmeticParams(), 2)[-1].merged
    distances = {
        name: (sinkhorn_to_teacher(world, tower, 0), sinkhorn_to_teacher(world, tower, 1))
        for name, tower in (("otmf", two_task.second.merged), ("alpha_blend", blend), ("task_arithmetic", ta))
    }
    print("Sinkhorn divergence to (θ1 on task-1 eval data, θ2 on task-2 eval data):", distances)
    for task in (0, 1):
        assert distances["otmf"][task] < 0.8 * distances["alpha_blend"][task]
        assert distances["otmf"][task] < distances["task_arithmetic"][task]
    assert two_task.second.metrics["best_iteration"] > 0


def test_otmf_says_plainly_when_its_masks_never_beat_the_all_ones_start(world: World, two_task: OTMFRun):
    assert two_task.second.metrics["masks_kept_all_ones"] is False and "warning" not in two_task.second.metrics
    # Merging a checkpoint onto itself: the α-blend is the checkpoint, both teachers agree with it exactly (held-out
    # loss 0), and any mask update can only lose. The step must keep the all-ones masks and say so.
    events: list[tuple[str, str, dict]] = []

    class Events(NullProgress):
        def event(self, type: str, message: str, data: dict | None = None) -> None:
            events.append((type, message, data or {}))

    task = StepTask("again", lambda: world.tasks[0], calibration=Inputs({"x": world.calibration[0]}))
    params = OTMFParams(steps=6, eval_every=2, composition="convex")
    result = merge_steps(world.family, world.loaded, get_method("otmf"), params, [task],
                         merged=world.tasks[0], state=MethodState(), position=1, device=CPU, progress=Events())
    m = result.steps[0]
    assert m["best_iteration"] == 0 and m["masks_kept_all_ones"] is True and "α-blend" in m["warning"]
    blend = merge_from_masks(world.base, world.tasks[0], world.tasks[0], None, None, params.scales(params.alpha))
    assert all(torch.equal(result.tower[k], blend[k]) for k in world.base)
    merged_event = next(data for type, _, data in events if type == "task_merged")
    assert merged_event["masks_kept_all_ones"] is True
    assert [(type, message) for type, message, _ in events if type == "step_warning"] == [
        ("step_warning", f"again: {m['warning']}")]


def test_otmf_is_bit_identical_for_the_same_seed(world: World, two_task: OTMFRun):
    again = step("otmf", world, two_task.first.merged, 1, two_task.first.state, TWO_TASK)
    assert all(torch.equal(again.merged[k], two_task.second.merged[k]) for k in world.base)
    assert again.metrics == two_task.second.metrics
    other = step("otmf", world, two_task.first.merged, 1, two_task.first.state, TWO_TASK.model_copy(update={"seed": 1}))
    assert any(not torch.equal(other.merged[k], two_task.second.merged[k]) for k in world.base)


def test_otmf_reservoir_stays_bounded_samples_every_task_and_persists(world: World, tmp_path: Path):
    params = OTMFParams(steps=2, eval_every=1, reservoir_per_task=16, reservoir_size=40)
    merged, state = world.base, MethodState()
    for i in range(len(world.tasks)):
        out = step("otmf", world, merged, i, state, params)
        held = out.state.tensors["reservoir.task_index"]
        assert len(held) == min(16 * (i + 1), 40) == out.metrics["reservoir_items"]
        assert out.state.meta["reservoir"]["seen"] == 16 * (i + 1)
        assert out.state.tensors["reservoir.inputs.x"].dtype == torch.float16
        if i > 0:
            assert out.metrics["pre_data"] == "reservoir"
        # Through a real safetensors file and JSON, as the lineage store keeps it.
        save_file(out.state.tensors, tmp_path / "state.safetensors")
        merged = out.merged
        state = MethodState(load_file(tmp_path / "state.safetensors"), json.loads(json.dumps(out.state.meta)))
    counts = torch.bincount(held.long(), minlength=len(world.tasks))
    print("reservoir inputs per task after 5 tasks:", counts.tolist())
    assert (counts > 0).all() and counts.sum() == 40


def test_otmf_replay_targets_keep_each_stored_input_with_its_own_tasks_features(world: World, tmp_path: Path):
    """Through reservoir replacement (Algorithm R), thinning to a lower capacity and the store's files, every held
    input keeps the features its own task's fine-tune gave it, and the next step matches them."""
    params = OTMFParams(steps=2, eval_every=1, reservoir_per_task=16, reservoir_size=40, replay_targets="task")
    merged, state = world.base, MethodState()
    for i in range(len(world.tasks)):
        if i == 4:  # the capacity lowered mid-lineage: a random subset is kept, each with its own target
            params = params.model_copy(update={"reservoir_size": 24})
        out = step("otmf", world, merged, i, state, params)
        if i > 0:
            assert out.metrics["pre_inputs"] == min(16 * i, params.reservoir_size)
            assert 16 <= out.metrics["pre_inputs_anchored"] <= out.metrics["pre_inputs"]  # the step's inputs
        save_file(out.state.tensors, tmp_path / "state.safetensors")
        merged = out.merged
        state = MethodState(load_file(tmp_path / "state.safetensors"), json.loads(json.dumps(out.state.meta)))
        held, x, targets = (state.tensors[f"reservoir.{k}"] for k in ("task_index", "inputs.x", "targets"))
        assert targets.dtype == torch.float16 and targets.shape == (len(held), 16)
        with torch.no_grad():
            own = torch.stack([world.family.features(world.loaded, world.tasks[t], {"x": x[j : j + 1].float()})[0]
                               for j, t in enumerate(held.tolist())])
        assert torch.allclose(targets.float(), own, atol=5e-3)
    assert len(set(held.tolist())) > 2


def test_otmf_replay_targets_fall_back_to_the_head_for_inputs_stored_without_one(world: World):
    first = step("otmf", world, world.base, 0, MethodState(), OTMFParams(steps=2, replay_targets="head"))
    assert "reservoir.targets" not in first.state.tensors
    anchored = OTMFParams(steps=2)  # replay_targets "task", the default
    second = step("otmf", world, first.merged, 1, first.state, anchored)
    stored = min(len(world.calibration[0]), anchored.reservoir_per_task)
    assert second.metrics["pre_inputs"] == stored and second.metrics["pre_inputs_anchored"] == 0
    targets, held = second.state.tensors["reservoir.targets"], second.state.tensors["reservoir.task_index"]
    assert targets[held == 0].isnan().all() and not targets[held == 1].isnan().any()
    third = step("otmf", world, second.merged, 2, second.state, anchored)
    assert 0 < third.metrics["pre_inputs_anchored"] < third.metrics["pre_inputs"]
    with pytest.raises(ValueError, match="pre_data: reservoir"):
        OTMFParams(pre_data="current", replay_targets="fine_tune")
    assert OTMFParams(pre_data="current").replay_targets == "task"  # the default means nothing without replay


@pytest.mark.parametrize("given", [{}, {"pre_data": "current"}, {"pre_data": "current", "alpha": 0.8},
                                   {"pre_data": "current", "composition": "convex"}, {"composition": "additive"}])
def test_otmf_params_a_manifest_records_validate_to_the_same_params(given: dict):
    """A manifest records every param resolved (model_dump); `mergeline rebuild` validates them again."""
    params = OTMFParams(**given)
    assert OTMFParams.model_validate(params.model_dump()) == params


def test_otmf_defaults_follow_the_mode():
    """The additive composition, at lr 0.03 without replay and 0.1 with it; with an α (the convex blend's weight),
    the paper's convex blend at lr 0.1. Batches of 32 with replay, 16 without. Whatever is given stays."""
    assert (OTMFParams().composition, OTMFParams().lr, OTMFParams().batch_size) == ("additive", 0.1, 32)
    assert OTMFParams(pre_data="current").batch_size == 16
    assert OTMFParams(batch_size=8).batch_size == 8
    assert OTMFParams(alpha=0.7).composition == "convex"
    no_replay = OTMFParams(pre_data="current")
    assert (no_replay.composition, no_replay.lr) == ("additive", 0.03)
    assert OTMFParams(pre_data="current", alpha=0.8).composition == "convex"
    assert OTMFParams(pre_data="current", alpha=0.8).lr == 0.1
    assert OTMFParams(pre_data="current", lr=0.2).lr == 0.2
    assert OTMFParams(composition="additive").lr == 0.1
    assert OTMFParams(pre_data="current", composition="convex").lr == 0.1


def test_otmf_replay_targets_follow_a_refitted_head_to_the_merged_tower(world: World):
    """When the job re-fits the task's head on the new tower (head_data), the targets its inputs keep are that
    tower's features, the ones the re-fitted head reads; `fine_tune` keeps the fine-tune's there too."""
    g = torch.Generator().manual_seed(4)

    head = {"weight": torch.randn(5, 16, generator=g), "bias": torch.zeros(5)}

    def second_step(targets: str) -> tuple[StepOutput, torch.Tensor]:
        labelled = Inputs({"x": world.eval[1][:32]}, labels=torch.randint(0, 5, (32,), generator=g))
        task = StepTask("task1", lambda: world.tasks[1], calibration=Inputs({"x": world.calibration[1]}),
                        head_data=labelled)
        evals = {"task1": EvalTask("task1", 2, labelled, head, "tasks[0]")}
        first = step("otmf", world, world.base, 0, MethodState(), OTMFParams(steps=2))
        outs: list[StepOutput] = []
        merge_steps(world.family, world.loaded, get_method("otmf"), OTMFParams(steps=2, replay_targets=targets),
                    [task], merged=first.merged, state=first.state, position=1, device=CPU, evals=evals,
                    on_step=lambda i, out: outs.append(out))
        return outs[0], evals["task1"].head["weight"]

    def own_features(out: StepOutput, tower: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        held, x = out.state.tensors["reservoir.task_index"], out.state.tensors["reservoir.inputs.x"]
        with torch.no_grad():
            expected = world.family.features(world.loaded, tower, {"x": x[held == 1].float()})
        return out.state.tensors["reservoir.targets"][held == 1].float(), expected

    refit, tuned = second_step("task")
    assert not torch.equal(tuned, head["weight"])  # the job re-fitted the head after the step
    stored, merged_features = own_features(refit, refit.merged)
    assert torch.allclose(stored, merged_features, atol=5e-3)
    kept, _ = second_step("fine_tune")
    stored, fine_tune_features = own_features(kept, world.tasks[1])
    assert torch.allclose(stored, fine_tune_features, atol=5e-3)
    assert not torch.allclose(merged_features, fine_tune_features, atol=5e-2)


def test_otmf_step_leaves_nothing_of_its_training_alive(world: World):
    """A worker runs step after step in one process: once a step has returned, its masked tower (θ_M, the masks,
    Adam's moments) must be freed, or the process grows by all of them every step."""
    def alive() -> int:  # other tests' kept tracebacks may hold theirs
        gc.collect()
        return sum(isinstance(o, _MaskedTower) for o in gc.get_objects())

    before = alive()
    step("otmf", world, world.tasks[0], 1, MethodState(), OTMFParams(steps=2, pre_data="current"))
    assert alive() == before


def test_otmf_replay_targets_anchor_earlier_tasks_to_their_fine_tunes(world: World):
    """Three tasks: matched against the stored features of their own fine-tune, replayed inputs keep the merge close
    to the first task's fine-tune on that task's unseen inputs; matched against the heads that drifted since, less
    (0.028 against 0.039 when written; equal when the stored targets are ignored)."""
    results = {}
    for targets in ("head", "task"):
        outs = run("otmf", world, OTMFParams(steps=100, replay_targets=targets), 3)
        results[targets] = sinkhorn_to_teacher(world, outs[-1].merged, 0)
    print("S_eps to task 0's fine-tune on its eval sample after 3 tasks:", results)
    assert results["task"] < 0.85 * results["head"]


def test_reservoir_stores_compactly_and_pads_token_inputs():
    g = torch.Generator().manual_seed(6)
    res = Reservoir(capacity=12)

    def tokens(n: int, length: int) -> Inputs:  # hf-like inputs: ids and a full attention mask
        ids = torch.randint(5, 1000, (n, length), generator=g)
        return Inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    res.add(tokens(10, 5), 0, 8, g)
    res.add(tokens(10, 7), 1, 8, g)
    assert len(res) == 12 and res.seen == 16
    assert res.inputs["input_ids"].dtype == torch.int32 and res.inputs["input_ids"].shape == (12, 7)
    batch = res.source().batch(torch.arange(12), CPU, torch.float32)
    assert batch["input_ids"].dtype == torch.int64
    from_first = (res.task_index == 0).nonzero().flatten()
    assert (batch["attention_mask"][from_first, 5:] == 0).all() and (batch["attention_mask"][from_first, :5] == 1).all()
    with pytest.raises(InvalidInput):
        res.add(Inputs({"input_ids": torch.zeros(3, 5).long()}), 2, 3, g)

    pixels = Reservoir(capacity=4)
    pixels.add(Inputs({"pixels": torch.randn(6, 3, 4, 4, generator=g)}), 0, 6, g)
    assert pixels.inputs["pixels"].dtype == torch.float16
    assert pixels.source().batch(torch.arange(4), CPU, torch.float32)["pixels"].dtype == torch.float32


def test_otmf_falls_back_to_current_data_when_the_reservoir_is_empty(world: World):
    head = run("task_arithmetic", world, TaskArithmeticParams(), 1)[-1]
    out = step("otmf", world, head.merged, 1, head.state, OTMFParams(steps=2, reservoir_per_task=64))
    assert out.metrics["pre_data"] == "current" and "pre_data_fallback" in out.metrics
    assert out.state.tensors["reservoir.task_index"].tolist() == [1] * 64

    current = step("otmf", world, head.merged, 1, MethodState(), OTMFParams(steps=2, pre_data="current"))
    assert current.metrics["pre_data"] == "current" and "pre_data_fallback" not in current.metrics
    assert current.state.tensors == {} and "reservoir" not in current.state.meta


def test_otmf_in_bfloat16_returns_float32(world: World):
    out = step("otmf", world, world.tasks[0], 1, MethodState(), OTMFParams(steps=4, eval_every=2, dtype="bfloat16"))
    assert_float32_cpu(out.merged, world.base)
    assert all(torch.isfinite(v).all() for v in out.merged.values())
    assert math.isfinite(out.metrics["loss_best"]) and out.metrics["loss_best"] <= out.metrics["loss_initial"]


def test_otmf_needs_calibration_data(world: World):
    inp = StepInput(
        base=world.base, merged=world.tasks[0], task=world.tasks[1], index=1, state=MethodState(),
        params=OTMFParams(), device=CPU, family=world.family, loaded=world.loaded, calibration=None,
    )  # fmt: skip
    with pytest.raises(InvalidInput):
        get_method("otmf").step(inp)


def test_otmf_pre_iterations_train_only_the_pre_mask(world: World):
    # τ_pre lives only in the first layer and τ_post only in the last, so each mask shows in its own tensors. A small
    # α leaves the student far from the head on D_pre, so one pre iteration visibly improves the held-out loss.
    base = world.base
    head = {k: world.tasks[0][k] if k == "0.weight" else v for k, v in base.items()}
    task = {k: world.tasks[1][k] if k == "5.weight" else v for k, v in base.items()}
    params = OTMFParams(steps=1, eval_every=1, alpha=0.05, lr=0.05, mask_update="alternate")
    reservoir = step("otmf", world, base, 0, MethodState(), params).state  # D_pre: task 0's inputs
    out = get_method("otmf").step(
        StepInput(
            base=base, merged=head, task=task, index=1, state=reservoir, params=params, device=CPU,
            family=world.family, loaded=world.loaded, calibration=Inputs({"x": world.calibration[1]}),
        )
    )  # fmt: skip
    assert out.metrics["best_iteration"] == 1  # the one (pre) iteration improved the held-out loss
    alpha = params.alpha
    untouched_post = base["5.weight"] + (1 - alpha) * (task["5.weight"] - base["5.weight"])
    torch.testing.assert_close(out.merged["5.weight"], untouched_post, rtol=0, atol=1e-7)
    untouched_pre = base["0.weight"] + alpha * (head["0.weight"] - base["0.weight"])
    assert (out.merged["0.weight"] - untouched_pre).abs().max() > 1e-4


def _one_mask_per_layer_step(world: World, params: OTMFParams) -> tuple[StepOutput, torch.Tensor]:
    """A step where τ_pre lives only in the first layer; returns the output and, for that layer, the ratio of the
    merged update to the all-ones update α·τ_pre: M_pre itself, element by element."""
    base = world.base
    head = {k: world.tasks[0][k] if k == "0.weight" else v for k, v in base.items()}
    task = {k: world.tasks[1][k] if k == "5.weight" else v for k, v in base.items()}
    out = get_method("otmf").step(StepInput(
        base=base, merged=head, task=task, index=1, state=MethodState(), params=params, device=CPU,
        family=world.family, loaded=world.loaded, calibration=Inputs({"x": world.calibration[1]})))
    tau = head["0.weight"] - base["0.weight"]
    return out, (out.merged["0.weight"] - base["0.weight"]) / (params.alpha * tau)


@pytest.mark.parametrize("granularity", ["element", "row", "tensor"])
def test_otmf_mask_granularity_learns_one_value_per_element_row_or_tensor(world: World, granularity: str):
    params = OTMFParams(steps=1, eval_every=1, alpha=0.05, lr=0.05, pre_data="current", mask_granularity=granularity)
    out, mask = _one_mask_per_layer_step(world, params)  # mask [32, 8]
    assert out.metrics["best_iteration"] == 1 and (mask - 1).abs().max() > 0.02  # the mask moved
    # The kept masks are bfloat16 copies (0.4%), and the ratio divides by τ: equal values agree within 1%.
    spread_in_rows, spread = mask.std(dim=1).max().item(), mask.std().item()
    if granularity == "element":
        assert spread_in_rows > 0.01
    elif granularity == "row":
        assert spread_in_rows < 0.01 < spread
    else:
        assert spread < 0.01


@pytest.mark.parametrize("bound", ["clamp", "sigmoid"])
def test_otmf_bounded_masks_stay_in_the_unit_interval(world: World, bound: str):
    params = OTMFParams(steps=20, eval_every=2, alpha=0.05, lr=0.2, pre_data="current", mask_bound=bound)
    out, mask = _one_mask_per_layer_step(world, params)
    low, high = out.metrics["mask_range"]
    assert out.metrics["best_iteration"] > 0 and 0.0 <= low < high <= 1.0
    assert mask.min().item() > -0.01 and mask.max().item() < 1.01
    unbounded, _ = _one_mask_per_layer_step(world, params.model_copy(update={"mask_bound": "none"}))
    assert unbounded.metrics["mask_range"][1] > 1.1  # the same training leaves [0, 1] when nothing bounds it


def test_otmf_epochs_are_passes_over_the_task_calibration_data(world: World):
    calls: list[tuple] = []
    params = OTMFParams(epochs=2, pre_data="current", eval_every=5, mask_update="alternate")
    out = step("otmf", world, world.tasks[0], 1, MethodState(), params, lambda *a: calls.append(a))
    # 96 inputs: 16 held out, 80 for training = 5 batches of 16 per pass; each pass updates both masks per batch.
    assert out.metrics["iterations"] == 2 * 2 * 5 == len(calls) and calls[-1][:2] == (20, 20)
    assert out.metrics["held_out"] == [16, 16]
    joint = step("otmf", world, world.tasks[0], 1, MethodState(), params.model_copy(update={"mask_update": "joint"}))
    assert joint.metrics["iterations"] == 2 * 5  # one iteration per batch, both masks each time


def test_otmf_joint_updates_descend_where_alternate_updates_climb_in_the_papers_mode(world: World):
    # With D_pre = D_t both masks see the same inputs and pull the features towards two teachers: alternate updates
    # raise the held-out sum of both losses, joint updates on that sum lower it (docs/otmf.md, "Why steps keep...").
    runs = {
        update: step("otmf", world, world.tasks[0], 1, MethodState(),
                     OTMFParams(alpha=0.5, steps=60, pre_data="current", mask_update=update)).metrics
        for update in ("alternate", "joint")
    }
    print({u: {k: round(m[k], 4) for k in ("loss_initial", "loss_best", "loss_final")} for u, m in runs.items()})
    alternate, joint = runs["alternate"], runs["joint"]
    assert joint["loss_initial"] == alternate["loss_initial"]
    assert alternate["loss_final"] > alternate["loss_initial"]
    assert joint["loss_final"] < 0.95 * joint["loss_initial"] and joint["best_iteration"] >= 30


def test_otmf_auto_alpha_trains_at_the_candidate_with_the_lowest_held_out_loss(world: World, monkeypatch):
    auto = step("otmf", world, world.tasks[0], 1, MethodState(),
                OTMFParams(alpha="auto", steps=20, eval_every=2, pre_data="current")).metrics
    losses = {float(a): loss for a, loss in auto["alpha_losses"].items()}
    assert list(losses) == list(OTMFParams.ALPHA_CANDIDATES)
    assert auto["alpha"] == min(losses, key=losses.__getitem__)
    assert auto["loss_initial"] == pytest.approx(losses[auto["alpha"]], rel=1e-5)
    # With one candidate, "auto" is that α: the masks train, and the head is merged, at it.
    monkeypatch.setattr(OTMFParams, "ALPHA_CANDIDATES", (0.3,))
    params = OTMFParams(steps=20, eval_every=2, pre_data="current", composition="convex")
    one = step("otmf", world, world.tasks[0], 1, MethodState(), params.model_copy(update={"alpha": "auto"}))
    fixed = step("otmf", world, world.tasks[0], 1, MethodState(), params.model_copy(update={"alpha": 0.3}))
    assert one.metrics["alpha"] == fixed.metrics["alpha"] == 0.3
    for k in fixed.merged:
        torch.testing.assert_close(one.merged[k], fixed.merged[k], rtol=1e-4, atol=1e-5)


def head_divergence(world: World, tower: Tensors, teacher: Tensors, head: Tensors, x: torch.Tensor) -> float:
    """KL from the teacher's class distribution to the tower's, through `head`, on inputs `x`."""
    with torch.no_grad():
        logits = [F.linear(world.family.features(world.loaded, t, {"x": x}), head["weight"], head["bias"])
                  for t in (tower, teacher)]
        return F.kl_div(F.log_softmax(logits[0], -1), F.log_softmax(logits[1], -1), reduction="batchmean",
                        log_target=True).item()


def test_otmf_head_alignment_brings_the_class_distributions_through_both_sides_heads_closer(world: World):
    # The paper's mode: both sides on the new task's inputs, the earlier task's head on the head's side.
    g = torch.Generator().manual_seed(3)
    heads = [{"weight": 6 * torch.randn(5, 16, generator=g), "bias": torch.randn(5, generator=g)} for _ in range(2)]
    head = world.tasks[0]

    def merge(weight: float) -> StepOutput:
        params = OTMFParams(steps=40, eval_every=5, lr=0.05, alpha=0.5, pre_data="current", head_alignment=weight)
        return get_method("otmf").step(StepInput(
            base=world.base, merged=head, task=world.tasks[1], index=1, state=MethodState(), params=params,
            device=CPU, family=world.family, loaded=world.loaded, calibration=Inputs({"x": world.calibration[1]}),
            heads=StepHeads(task=heads[1], earlier={0: heads[0]})))

    plain, aligned = merge(0.0), merge(1.0)
    assert aligned.metrics["aligned_heads"] == {"pre": 1, "post": 1} and "aligned_heads" not in plain.metrics
    x = world.eval[1]  # inputs the masks never saw
    for teacher, h in ((head, heads[0]), (world.tasks[1], heads[1])):
        without, with_heads = (head_divergence(world, out.merged, teacher, h, x) for out in (plain, aligned))
        print("KL through the head, without and with alignment:", without, with_heads)
        assert with_heads < 0.8 * without


def test_otmf_replay_heads_own_reads_each_replayed_input_through_its_own_tasks_head_only():
    g = torch.Generator().manual_seed(4)
    heads = [(6 * torch.randn(5, 16, generator=g), torch.randn(5, generator=g)) for _ in range(2)]
    features, teacher = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    tasks = torch.tensor([0, 0, 2, 1, 1, 0])  # lineage positions; task 1 has no head here
    own = _Heads(heads, 2.0, owners=[0, 2])

    def kl(rows: list[int], head: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits = [F.linear(f[rows], *head) for f in (features, teacher)]
        return F.kl_div(F.log_softmax(logits[0], -1), F.log_softmax(logits[1], -1), reduction="batchmean",
                        log_target=True)

    expected = 2.0 * (3 / 6 * kl([0, 1, 5], heads[0]) + 1 / 6 * kl([2], heads[1]))
    torch.testing.assert_close(own.divergence(features, teacher, tasks), expected)
    moved = features.clone()
    moved[3:5] += 5.0  # task 1's inputs: no head of theirs, nothing to add
    torch.testing.assert_close(own.divergence(moved, teacher, tasks), expected)
    every = _Heads(heads, 2.0).divergence(features, teacher, tasks)  # all heads on all inputs
    torch.testing.assert_close(every, 2.0 * (kl(list(range(6)), heads[0]) + kl(list(range(6)), heads[1])) / 2)


def test_otmf_replay_heads_own_reaches_the_step_through_the_reservoir(world: World):
    g = torch.Generator().manual_seed(5)
    heads = [{"weight": 6 * torch.randn(5, 16, generator=g), "bias": torch.randn(5, generator=g)} for _ in range(3)]
    plain = OTMFParams(steps=2, eval_every=1, reservoir_per_task=16)
    first = step("otmf", world, world.base, 0, MethodState(), plain)
    second = step("otmf", world, first.merged, 1, first.state, plain)

    def third(replay_heads: str) -> StepOutput:
        params = OTMFParams(steps=20, eval_every=5, lr=0.05, reservoir_per_task=16, head_alignment=3.0,
                            replay_heads=replay_heads)
        return get_method("otmf").step(StepInput(
            base=world.base, merged=second.merged, task=world.tasks[2], index=2, state=second.state, params=params,
            device=CPU, family=world.family, loaded=world.loaded, calibration=Inputs({"x": world.calibration[2]}),
            heads=StepHeads(task=heads[2], earlier={0: heads[0], 1: heads[1]})))

    own, every = third("own"), third("all")
    assert own.metrics["aligned_heads"] == every.metrics["aligned_heads"] == {"pre": 2, "post": 1}
    assert own.metrics["loss_initial"] != every.metrics["loss_initial"]
    with pytest.raises(ValueError, match="replay_heads: own"):
        OTMFParams(pre_data="current", head_alignment=1.0, replay_heads="own")
    with pytest.raises(ValueError, match="replay_heads: own"):
        OTMFParams(replay_heads="own")


def test_otmf_head_alignment_needs_the_tasks_head(world: World):
    params = OTMFParams(steps=2, pre_data="current", head_alignment=1.0)
    with pytest.raises(InvalidInput, match="head_alignment"):
        get_method("otmf").step(StepInput(
            base=world.base, merged=world.tasks[0], task=world.tasks[1], index=1, state=MethodState(),
            params=params, device=CPU, family=world.family, loaded=world.loaded,
            calibration=Inputs({"x": world.calibration[1]})))


def test_otmf_cosine_lr_schedule_halves_the_second_of_two_updates(world: World):
    # Adam's first update moves each mask value by lr, its second by a little less: a cosine over two iterations
    # takes the second at lr/2, so the masks move about 0.75–0.85 as far as at a constant lr (exactly as far
    # without the decay).
    def moved(schedule: str) -> float:
        params = OTMFParams(steps=2, eval_every=2, alpha=0.05, lr=0.01, pre_data="current", lr_schedule=schedule)
        out, mask = _one_mask_per_layer_step(world, params)
        assert out.metrics["best_iteration"] == 2
        return (mask - 1).abs().mean().item()

    ratio = moved("cosine") / moved("constant")
    assert 0.6 < ratio < 0.92, ratio
