"""OTMF: continual fusion by optimal transport (arXiv 2511.19561), as specified in docs/otmf.md.

One step merges task t onto the lineage head θ0 + τ_pre. Element-wise masks M_pre, M_post (initialised to ones)
weight the two task vectors,
    θ_M = θ0 + α·(M_pre ⊙ τ_pre) + (1 − α)·(M_post ⊙ τ_post),      τ_post = θ_t − θ0,
and are trained, alternately, so that the merged tower's features on D_pre match the head's and its features on D_t
match θ_t's, by the debiased Sinkhorn divergence between the two feature clouds. The masks with the lowest loss on
held-out calibration batches are kept, and the new head is θ0 + α·(M_pre ⊙ τ_pre) + (1 − α)·(M_post ⊙ τ_post).

State (MethodState): meta {"method": "otmf", "reservoir": {...}} and the reservoir's tensors when
`pre_data` is "reservoir" (see worker/engine/methods/reservoir.py); nothing else is carried between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import InvalidInput
from core.methods import OTMFParams
from engine.families.base import Family, LoadedBase, Tensors
from engine.methods.base import Method, MethodState, StepInput, StepOutput
from engine.methods.common import generator, own_state, to_cpu, to_device
from engine.methods.reservoir import InputSource, Reservoir
from engine.sinkhorn import sinkhorn_divergence

# Independent random streams of one step: batches, thinning a carried reservoir, sampling into the reservoir.
_DATA_STREAM, _RESERVOIR_LOAD_STREAM, _RESERVOIR_ADD_STREAM = 0, 1, 2


def compose(theta0: Tensors, a: Tensors, b: Tensors, m_pre: Tensors, m_post: Tensors, dtype: torch.dtype) -> Tensors:
    """θ_M = θ0 + M_pre ⊙ a + M_post ⊙ b per tensor, with a = α·τ_pre and b = (1 − α)·τ_post scaled once per step.
    Computed in float32 (the masks' dtype) and cast to the forward's dtype; differentiable in the masks."""
    return {k: torch.addcmul(torch.addcmul(theta0[k], m_pre[k], a[k]), m_post[k], b[k]).to(dtype) for k in theta0}


def merge_from_masks(
    base: Tensors, head: Tensors, task: Tensors, m_pre: Tensors | None, m_post: Tensors | None, alpha: float
) -> Tensors:
    """The new head θ0 + α·(M_pre ⊙ (θ − θ0)) + (1 − α)·(M_post ⊙ (θ_t − θ0)), float32 on the CPU, from the
    float32 originals (so a bfloat16 optimisation loses no precision in the result), one tensor at a time.
    A mask of None means all ones, without allocating it."""
    out = {}
    for k in base:
        pre, post = head[k] - base[k], task[k] - base[k]
        if m_pre is not None:
            pre.mul_(to_cpu(m_pre[k]))
        if m_post is not None:
            post.mul_(to_cpu(m_post[k]))
        out[k] = pre.mul_(alpha).add_(post.mul_(1.0 - alpha)).add_(base[k])
    return out


@dataclass
class _TeacherFeatures:
    """A teacher's features of the inputs a step uses, computed once: features [U, D] float32 on the device and,
    for every input of the source, its row in `features` (−1 for inputs the step never draws)."""

    features: torch.Tensor
    rows: torch.Tensor  # int64 [N], CPU

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return self.features[self.rows[index].to(self.features.device)]


@torch.no_grad()
def _teacher_features(
    family: Family,
    loaded: LoadedBase,
    weights: Tensors,
    source: InputSource,
    used: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    chunk: int,
) -> _TeacherFeatures:
    tower = {k: to_device(v, device, dtype) for k, v in weights.items()}
    feats = [
        family.features(loaded, tower, source.batch(used[i : i + chunk], device, dtype)).float()
        for i in range(0, used.shape[0], chunk)
    ]
    rows = torch.full((len(source),), -1, dtype=torch.int64)
    rows[used] = torch.arange(used.shape[0])
    return _TeacherFeatures(torch.cat(feats), rows)


def _split(n: int, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(held_out, pool) indices: one fixed batch held out for choosing masks, the rest for training. With fewer than
    four inputs nothing can be spared, and the masks are judged on the training inputs themselves."""
    perm = torch.randperm(n, generator=gen)
    hold = min(batch_size, n // 2)
    if hold < 2:
        return perm, perm
    return perm[:hold], perm[hold:]


class _Batches:
    """Batches drawn without replacement from `pool`, reshuffled each time it runs out (epochs, last partial batch
    dropped), so every input is seen about equally often."""

    def __init__(self, pool: torch.Tensor, batch_size: int, gen: torch.Generator):
        self.pool, self.size, self.gen = pool, min(batch_size, pool.shape[0]), gen
        self.order, self.cursor = pool[:0], 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.size > self.order.shape[0]:
            self.order, self.cursor = self.pool[torch.randperm(self.pool.shape[0], generator=self.gen)], 0
        self.cursor += self.size
        return self.order[self.cursor - self.size : self.cursor]


class OTMF(Method):

    def step(self, inp: StepInput) -> StepOutput:
        params: OTMFParams = inp.params
        calibration = inp.calibration
        if calibration is not None and (not calibration.tensors or len(calibration) == 0):
            calibration = None
        keep_reservoir = params.pre_data == "reservoir"
        reservoir = None
        if keep_reservoir:
            prev = own_state(inp.state, self.name)
            load_gen = generator(params.seed, inp.index, _RESERVOIR_LOAD_STREAM)
            reservoir = Reservoir.from_state(prev, params.reservoir_size, load_gen)
        if calibration is None and (inp.index > 0 or keep_reservoir):
            raise InvalidInput("otmf needs calibration data for every task", param="tasks.calibration")
        if reservoir is not None and calibration is not None:
            reservoir.check(calibration)

        if inp.index == 0:
            # The lineage's first task: θ0 + τ_1 = θ_1, nothing to fuse (the checkpoint's tensors are shared).
            merged = {k: to_cpu(inp.task[k]) for k in inp.base}
            metrics: dict = {"iterations": 0, "pre_data": params.pre_data}
            inp.progress(1, 1, None)
        else:
            assert calibration is not None
            post = InputSource.from_inputs(calibration)
            if reservoir is not None and len(reservoir) > 0:
                pre, pre_used = reservoir.source(), "reservoir"
            else:
                pre, pre_used = post, "current"
            merged, metrics = _optimise(inp, params, pre, post)
            metrics["pre_data"] = pre_used
            if keep_reservoir and pre_used == "current":
                # The head was written by another method (or by otmf with pre_data "current"): no earlier inputs.
                metrics["pre_data_fallback"] = "reservoir empty: the current task's calibration inputs stood in"

        state = MethodState(meta={"method": self.name})
        if reservoir is not None and calibration is not None:
            add_gen = generator(params.seed, inp.index, _RESERVOIR_ADD_STREAM)
            reservoir.add(calibration, inp.index, params.reservoir_per_task, add_gen)
            state.tensors, state.meta["reservoir"] = reservoir.to_state()
            metrics["reservoir_items"] = len(reservoir)
        return StepOutput(merged=merged, state=state, metrics=metrics)


def _optimise(inp: StepInput, params: OTMFParams, pre: InputSource, post: InputSource) -> tuple[Tensors, dict]:
    """One fusion step with data: the new head (float32, CPU) and the step's metrics."""
    m_pre, m_post, metrics = _train_masks(inp, params, pre, post)  # the device-side state is freed on return
    return merge_from_masks(inp.base, inp.merged, inp.task, m_pre, m_post, params.alpha), metrics


def _train_masks(
    inp: StepInput, params: OTMFParams, pre: InputSource, post: InputSource
) -> tuple[Tensors | None, Tensors | None, dict]:
    """Train M_pre and M_post; returns the masks with the lowest held-out loss (on the device; None while the
    initial all-ones masks were never bettered) and the metrics."""
    device = torch.device(inp.device)
    dtype = torch.bfloat16 if params.dtype == "bfloat16" else torch.float32
    family, loaded = inp.family, inp.loaded
    same_data = pre is post
    gen = generator(params.seed, inp.index, _DATA_STREAM)

    # Held-out batches and the whole schedule of training batches are drawn first, so the teachers' features are
    # computed once for exactly the inputs the step will use.
    pre_hold, pre_pool = _split(len(pre), params.batch_size, gen)
    post_hold, post_pool = (pre_hold, pre_pool) if same_data else _split(len(post), params.batch_size, gen)
    pre_batches, post_batches = _Batches(pre_pool, params.batch_size, gen), _Batches(post_pool, params.batch_size, gen)
    schedule = [pre_batches.next() if s % 2 == 0 else post_batches.next() for s in range(params.steps)]
    pre_used = torch.unique(torch.cat([pre_hold, *schedule[0::2]]))
    post_used = torch.unique(torch.cat([post_hold, *schedule[1::2]]))
    chunk = params.batch_size
    teacher_pre = _teacher_features(family, loaded, inp.merged, pre, pre_used, device, dtype, chunk)
    teacher_post = _teacher_features(family, loaded, inp.task, post, post_used, device, dtype, chunk)

    # On the device: θ0 and the pre-scaled task vectors a = α·τ_pre, b = (1 − α)·τ_post (in the forward's dtype), two
    # float32 masks and Adam's four moments: 9× the tower in float32 whatever the lineage's length, plus per iteration
    # θ_M and one mask's gradient, and a bfloat16 copy of the best masks (1×) once the held-out loss has improved.
    alpha = params.alpha
    theta0 = {k: to_device(v, device, dtype) for k, v in inp.base.items()}
    a = {k: to_device((inp.merged[k] - inp.base[k]).mul_(alpha), device, dtype) for k in inp.base}
    b = {k: to_device((inp.task[k] - inp.base[k]).mul_(1.0 - alpha), device, dtype) for k in inp.base}
    m_pre = {k: torch.ones_like(v, dtype=torch.float32, requires_grad=True) for k, v in theta0.items()}
    m_post = {k: torch.ones_like(v, dtype=torch.float32, requires_grad=True) for k, v in theta0.items()}
    opt = torch.optim.Adam([*m_pre.values(), *m_post.values()], lr=params.lr)

    def student(masks_pre: Tensors, masks_post: Tensors, source: InputSource, index: torch.Tensor) -> torch.Tensor:
        tower = compose(theta0, a, b, masks_pre, masks_post, dtype)
        return family.features(loaded, tower, source.batch(index, device, dtype)).float()  # [B, D]

    @torch.no_grad()
    def held_out_loss() -> float:
        tower = compose(theta0, a, b, m_pre, m_post, dtype)
        f_pre = family.features(loaded, tower, pre.batch(pre_hold, device, dtype)).float()
        f_post = f_pre if same_data else family.features(loaded, tower, post.batch(post_hold, device, dtype)).float()
        loss = sinkhorn_divergence(f_pre, teacher_pre.take(pre_hold), params.blur)
        loss = loss + sinkhorn_divergence(f_post, teacher_post.take(post_hold), params.blur)
        return loss.item()

    initial = best = held_out_loss()
    best_iteration = 0
    best_pre: Tensors | None = None  # None: the initial all-ones masks are still the best
    best_post: Tensors | None = None
    final = initial
    for s in range(params.steps):
        index = schedule[s]
        if s % 2 == 0:  # D_pre against the head; M_post is a constant here, so no gradient is built for it
            masks_post = {k: v.detach() for k, v in m_post.items()}
            loss = sinkhorn_divergence(student(m_pre, masks_post, pre, index), teacher_pre.take(index), params.blur)
        else:  # D_t against θ_t; M_pre is the constant
            masks_pre = {k: v.detach() for k, v in m_pre.items()}
            loss = sinkhorn_divergence(student(masks_pre, m_post, post, index), teacher_post.take(index), params.blur)
        opt.zero_grad(set_to_none=True)  # the constant side keeps grad None, and Adam skips it
        loss.backward()
        opt.step()
        inp.progress(s + 1, params.steps, loss.detach().item())

        if (s + 1) % params.eval_every == 0 or s + 1 == params.steps:
            final = held_out_loss()
            if final < best:
                best, best_iteration = final, s + 1
                with torch.no_grad():
                    # bfloat16 keeps each mask within 0.4% for half the memory of a float32 copy: the copies
                    # would otherwise be the step's largest item after Adam's moments.
                    if best_pre is None or best_post is None:
                        best_pre = {k: v.detach().to(torch.bfloat16) for k, v in m_pre.items()}
                        best_post = {k: v.detach().to(torch.bfloat16) for k, v in m_post.items()}
                    else:
                        for k in m_pre:
                            best_pre[k].copy_(m_pre[k])
                            best_post[k].copy_(m_post[k])

    metrics = {
        "iterations": params.steps,
        "loss_initial": initial,
        "loss_final": final,
        "loss_best": best,
        "best_iteration": best_iteration,
        "pre_inputs": len(pre),
        "held_out": [int(pre_hold.shape[0]), int(post_hold.shape[0])],
    }
    return best_pre, best_post, metrics
