"""OTMF: continual fusion by optimal transport (arXiv 2511.19561), as specified in docs/otmf.md.

One step merges task t onto the lineage head θ0 + τ_pre. Element-wise masks M_pre, M_post (initialised to ones)
weight the two task vectors,
    θ_M = θ0 + α·(M_pre ⊙ τ_pre) + (1 − α)·(M_post ⊙ τ_post),      τ_post = θ_t − θ0,
and are trained, alternately, so that the merged tower's features on D_pre match the head's and its features on D_t
match θ_t's, by the debiased Sinkhorn divergence between the two feature clouds. The masks with the lowest loss on
held-out calibration batches are kept, and the new head is θ0 + α·(M_pre ⊙ τ_pre) + (1 − α)·(M_post ⊙ τ_post).
With `head_alignment` (an extension) each side's loss also compares the two class distributions through the tasks'
heads.

State (MethodState): meta {"method": "otmf", "reservoir": {...}} and the reservoir's tensors when
`pre_data` is "reservoir" (see engine/methods/reservoir.py), with each stored input's features as its own task's head
reads them unless `replay_targets` is "head"; nothing else is carried between steps.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.errors import InvalidInput
from core.methods import OTMFParams
from engine.families.base import Family, LoadedBase, Tensors
from engine.inputs import Inputs
from engine.methods.base import Method, MethodState, StepHeads, StepInput, StepOutput
from engine.methods.common import generator, own_state, to_cpu, to_device
from engine.methods.reservoir import InputSource, Reservoir
from engine.sinkhorn import sinkhorn_divergence

# Independent random streams of one step: batches, thinning a carried reservoir, sampling into the reservoir.
_DATA_STREAM, _RESERVOIR_LOAD_STREAM, _RESERVOIR_ADD_STREAM = 0, 1, 2


def compose(theta0: Tensors, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], m_pre: Tensors,
            m_post: Tensors, dtype: torch.dtype, out: Tensors | None = None) -> Tensors:
    """θ_M = θ0 + M_pre ⊙ a + M_post ⊙ b per tensor, with a = s_pre·τ_pre and b = s_post·τ_post scaled once per step.
    Computed in float32 (the masks' dtype) and cast to the forward's dtype, into `out`'s tensors when given;
    differentiable in the masks otherwise."""
    composed = {}
    for k in theta0:
        value = torch.addcmul(torch.addcmul(theta0[k], m_pre[k], a[k]), m_post[k], b[k])
        composed[k] = value.to(dtype) if out is None else out[k].copy_(value)
    return composed


def merge_from_masks(
    base: Tensors, head: Tensors, task: Tensors, m_pre: Tensors | None, m_post: Tensors | None,
    scales: tuple[float, float], into: Tensors | None = None,
) -> Tensors:
    """The new head θ0 + s_pre·(M_pre ⊙ (θ − θ0)) + s_post·(M_post ⊙ (θ_t − θ0)), float32 on the CPU, from the
    float32 originals (so a bfloat16 optimisation loses no precision in the result), one tensor at a time, written
    into `into`'s tensors when given. A mask of None means all ones, without allocating it."""
    out = {}
    for k in base:
        pre, post = head[k] - base[k], task[k] - base[k]
        if m_pre is not None:
            pre.mul_(to_cpu(m_pre[k]))
        if m_post is not None:
            post.mul_(to_cpu(m_post[k]))
        value = pre.mul_(scales[0]).add_(post.mul_(scales[1])).add_(base[k])
        out[k] = value if into is None else into[k].copy_(value)
    return out


@dataclass
class _TeacherFeatures:
    """A teacher's features of the inputs a step uses, computed once: features [U, D] float32 on the device and,
    for every input of the source, its row in `features` (−1 for inputs the step never draws)."""

    features: torch.Tensor
    rows: torch.Tensor  # int64 [N], CPU

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return self.features[self.rows[index].to(self.features.device)]

    def replace(self, targets: torch.Tensor) -> int:
        """Take `targets` [N, D] (NaN rows: none) as the features of the used inputs that have one; returns how
        many of them do."""
        used = torch.nonzero(self.rows >= 0).squeeze(1)
        stored = targets[used].float()
        has = ~stored.isnan().any(dim=1)
        rows = self.rows[used[has]].to(self.features.device)
        self.features[rows] = stored[has].to(self.features.device)
        return int(has.sum())


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
            # The lineage's first task: θ0 + τ_1 = θ_1, nothing to fuse (the checkpoint's tensors are shared), or
            # θ0 + λ·τ_1 with the additive composition.
            merged = ({k: to_cpu(inp.task[k]) for k in inp.base} if params.composition == "convex" else
                      merge_from_masks(inp.base, inp.base, inp.task, None, None, params.scales(params.alpha)))
            metrics: dict = {"iterations": 0, "pre_data": params.pre_data}
            inp.progress(1, 1, None)
        else:
            assert calibration is not None
            post = InputSource.from_inputs(calibration)
            if reservoir is not None and len(reservoir) > 0:
                pre, pre_used = reservoir.source(), "reservoir"
            else:
                pre, pre_used = post, "current"
            anchored = pre_used == "reservoir" and params.stores_targets
            merged, metrics = _optimise(inp, params, pre, post, reservoir.targets if anchored else None)
            if anchored:  # inputs stored by steps that kept no targets fall back to the head's features
                metrics.setdefault("pre_inputs_anchored", 0)
            metrics["pre_data"] = pre_used
            if keep_reservoir and pre_used == "current":
                # The head was written by another method (or by otmf with pre_data "current"): no earlier inputs.
                metrics["pre_data_fallback"] = "reservoir empty: the current task's calibration inputs stood in"

        state = MethodState(meta={"method": self.name})
        if reservoir is not None and calibration is not None:
            add_gen = generator(params.seed, inp.index, _RESERVOIR_ADD_STREAM)
            target_of = _targets_of(inp, params, calibration, merged)
            reservoir.add(calibration, inp.index, params.reservoir_per_task, add_gen, target_of)
            state.tensors, state.meta["reservoir"] = reservoir.to_state()
            metrics["reservoir_items"] = len(reservoir)
        return StepOutput(merged=merged, state=state, metrics=metrics)


def _targets_of(
    inp: StepInput, params: OTMFParams, calibration: Inputs, merged: Mapping[str, torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The function giving the targets the new task's calibration inputs (by position) keep in the reservoir, on
    the CPU: their features under the tower the task's head reads, its fine-tune's, or the new head `merged` when
    the job re-fits the task's head on it (`replay_targets: task`); None when replay matches against the head."""
    if not params.stores_targets:
        return None
    tower = merged if params.replay_targets == "task" and inp.heads.task_refit else inp.task

    def features(index: torch.Tensor) -> torch.Tensor:
        return _teacher_features(inp.family, inp.loaded, tower, InputSource.from_inputs(calibration), index,
                                 torch.device(inp.device), _forward_dtype(params), params.batch_size).features.cpu()
    return features


def _forward_dtype(params: OTMFParams) -> torch.dtype:
    return torch.bfloat16 if params.dtype == "bfloat16" else torch.float32


def _optimise(inp: StepInput, params: OTMFParams, pre: InputSource, post: InputSource,
              anchors: torch.Tensor | None) -> tuple[Tensors, dict]:
    """One fusion step with data: the new head (float32, CPU) and the step's metrics. `anchors`: the stored targets
    of D_pre's inputs (NaN rows where an input has none), which replace the head's features as their teacher."""
    m_pre, m_post, metrics, spare = _train_masks(inp, params, pre, post, anchors)  # device state freed on return
    scales = tuple(metrics["scales"])
    return merge_from_masks(inp.base, inp.merged, inp.task, m_pre, m_post, scales, into=spare), metrics


def _train_masks(
    inp: StepInput, params: OTMFParams, pre: InputSource, post: InputSource, anchors: torch.Tensor | None
) -> tuple[Tensors | None, Tensors | None, dict, Tensors | None]:
    """Train M_pre and M_post; returns the masks with the lowest held-out loss (on the device; None while the
    all-ones masks, the α-blend, were never bettered), the metrics, and θ_M's storage when the new head can be
    written into it."""
    device = torch.device(inp.device)
    dtype = _forward_dtype(params)
    same_data = pre is post
    gen = generator(params.seed, inp.index, _DATA_STREAM)
    schedule = _draw_schedule(len(pre), None if same_data else len(post), params, gen)
    steps = schedule.steps
    # Each teacher's features are computed once, for exactly the inputs the step will use.
    chunk = params.batch_size
    pre_heads, post_heads = _aligned_heads(inp.heads, params, device)
    pre_teacher = _teacher_features(inp.family, inp.loaded, inp.merged, pre, schedule.used_pre(), device, dtype, chunk)
    anchored = 0 if anchors is None else pre_teacher.replace(anchors)
    pre_side = _Side(pre, schedule.pre_hold, pre_teacher, pre_heads)
    post_side = _Side(post, schedule.post_hold, _teacher_features(
        inp.family, inp.loaded, inp.task, post, schedule.used_post(), device, dtype, chunk), post_heads)

    auto = params.alpha == "auto"
    alpha = 0.5 if auto else params.alpha
    tower = _MaskedTower(inp, params, params.scales(alpha), device, dtype)
    alpha_losses = {}
    if auto:  # each candidate's α-blend on the held-out batches; the masks then train at the best one
        alpha_losses = {a: tower.held_out_loss(pre_side, post_side, same_data, params.blur, blend=params.scales(a))
                        for a in OTMFParams.ALPHA_CANDIDATES}
        alpha = min(alpha_losses, key=alpha_losses.__getitem__)
        tower.rescale(params.scales(alpha))
    # The blend at all-ones masks is what any trained masks must beat, whatever the masks start from.
    initial = final = tower.held_out_loss(pre_side, post_side, same_data, params.blur, blend=tower.scales)
    best = _BestMasks(initial)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(tower.opt, steps) if params.lr_schedule == "cosine" else None
    for s in range(steps):
        if params.mask_update == "joint":  # both masks on the sum of both sides' losses
            sides = tower.train_joint(pre_side, post_side, schedule.pre[s], schedule.post[s], blur=params.blur)
            inp.progress(s + 1, steps, sides["pre"] + sides["post"], None, sides)
        else:  # alternately M_pre on D_pre against the head and M_post on D_t against θ_t
            on_pre = s % 2 == 0
            side, index = (pre_side, schedule.pre[s // 2]) if on_pre else (post_side, schedule.post[s // 2])
            loss = tower.train_iteration(side, index, train_pre=on_pre, blur=params.blur)
            inp.progress(s + 1, steps, loss, "pre" if on_pre else "post")
        if decay is not None:
            decay.step()
        if (s + 1) % params.eval_every == 0 or s + 1 == steps:
            final = tower.held_out_loss(pre_side, post_side, same_data, params.blur)
            best.offer(final, s + 1, *tower.masks())

    metrics = {
        "iterations": steps,
        **({"alpha": alpha} if params.composition == "convex" else {}),
        "scales": list(tower.scales),
        **({"alpha_losses": {str(a): loss for a, loss in alpha_losses.items()}} if auto else {}),
        "loss_initial": initial,
        "loss_final": final,
        "loss_best": best.loss,
        "best_iteration": best.iteration,
        "masks_kept_all_ones": best.iteration == 0,
        "pre_inputs": len(pre),
        **({"pre_inputs_anchored": anchored} if anchors is not None else {}),
        "held_out": [int(schedule.pre_hold.shape[0]), int(schedule.post_hold.shape[0])],
        **({"aligned_heads": {"pre": len(pre_heads.heads), "post": len(post_heads.heads)}}
           if params.head_alignment > 0 else {}),
    }
    if best.pre is not None and best.post is not None:
        values = [v for masks in (best.pre, best.post) for v in masks.values()]
        metrics["mask_range"] = [min(v.min().item() for v in values), max(v.max().item() for v in values)]
    if best.iteration == 0:
        metrics["warning"] = (
            f"the masks never beat the all-ones start on the held-out batches (held-out loss {initial:.4g}, "
            f"{final:.4g} after training): this step is the plain "
            + ("α-blend" if params.composition == "convex" else "sum") + " of the two task vectors")
    return best.pre, best.post, metrics, tower.spare()


@dataclass
class _Schedule:
    """Every input a step uses, drawn before training starts: one held-out batch per side, for choosing masks, and
    the training batches of each side in the order iterations use them (alternate: even iterations take the next
    D_pre batch, odd ones the next D_t batch; joint: every iteration one of each)."""

    steps: int
    pre_hold: torch.Tensor
    post_hold: torch.Tensor
    pre: list[torch.Tensor]
    post: list[torch.Tensor]

    def used_pre(self) -> torch.Tensor:
        return torch.unique(torch.cat([self.pre_hold, *self.pre]))

    def used_post(self) -> torch.Tensor:
        return torch.unique(torch.cat([self.post_hold, *self.post]))


def _draw_schedule(n_pre: int, n_post: int | None, params: OTMFParams, gen: torch.Generator) -> _Schedule:
    """The step's schedule; `n_post` None when D_t is D_pre itself (both sides then share their split). Its length
    is `steps`, or with `epochs` as many iterations as take every training batch of D_t once, per epoch (two per
    batch when the masks alternate, one when both train on every iteration)."""
    pre_hold, pre_pool = _split(n_pre, params.batch_size, gen)
    post_hold, post_pool = (pre_hold, pre_pool) if n_post is None else _split(n_post, params.batch_size, gen)
    pre_batches, post_batches = _Batches(pre_pool, params.batch_size, gen), _Batches(post_pool, params.batch_size, gen)
    if params.epochs is None:
        steps = params.steps or OTMFParams.DEFAULT_STEPS
    else:
        per_batch = 1 if params.mask_update == "joint" else 2  # iterations that use one training batch of D_t
        steps = per_batch * params.epochs * (post_pool.shape[0] // post_batches.size)
    n_pre, n_post = (steps, steps) if params.mask_update == "joint" else ((steps + 1) // 2, steps // 2)
    pre: list[torch.Tensor] = []
    post: list[torch.Tensor] = []
    for i in range(n_pre):  # drawn interleaved, in the order the iterations use them
        pre.append(pre_batches.next())
        if i < n_post:
            post.append(post_batches.next())
    return _Schedule(steps, pre_hold, post_hold, pre, post)


@dataclass
class _Heads:
    """Linear heads (weight [C, D], bias [C] or None) on the device, and the weight of the KL term through them;
    with `owners` (each head's lineage position), each input is read by its own task's head only."""

    heads: list[tuple[torch.Tensor, torch.Tensor | None]]
    weight: float
    owners: list[int] | None = None

    def divergence(self, features: torch.Tensor, teacher: torch.Tensor, tasks: torch.Tensor | None) -> torch.Tensor:
        """weight · KL(the teacher's class distribution ‖ the features'), averaged over inputs and heads, or with
        `owners` over inputs through their own task's head (`tasks`: each input's lineage position; inputs of a
        task without a head add nothing)."""
        if self.owners is None:
            total = sum(_kl(features, teacher, w, b) for w, b in self.heads)
            return total * (self.weight / len(self.heads))
        if tasks is None:  # inputs of no known task (the current task's standing in for an empty reservoir)
            return features.new_zeros(())
        total = sum(_kl(features[tasks == owner], teacher[tasks == owner], w, b, reduction="sum")
                    for owner, (w, b) in zip(self.owners, self.heads, strict=True))
        return total * (self.weight / len(tasks))


def _kl(features: torch.Tensor, teacher: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
        reduction: str = "batchmean") -> torch.Tensor:
    """KL(the teacher's class distribution ‖ the features') through one head, averaged (or summed) over inputs."""
    student, target = F.log_softmax(F.linear(features, w, b), -1), F.log_softmax(F.linear(teacher, w, b), -1)
    return F.kl_div(student, target, reduction=reduction, log_target=True)


def _aligned_heads(heads: StepHeads, params: OTMFParams, device: torch.device) -> tuple[_Heads, _Heads]:
    """The heads each side aligns through: the lineage's earlier tasks' on D_pre, the new task's on D_t; none
    without `head_alignment`."""
    if params.head_alignment == 0:
        return _Heads([], 0.0), _Heads([], 0.0)
    if heads.task is None:
        raise InvalidInput("otmf's head_alignment needs the task's head (give the task's `head` and `eval`)",
                           param="params.head_alignment")

    def on_device(head: Tensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = head.get("bias")
        return (head["weight"].to(device, torch.float32),
                None if bias is None else bias.to(device, torch.float32))

    owners = list(heads.earlier) if params.replay_heads == "own" else None
    return (_Heads([on_device(h) for h in heads.earlier.values()], params.head_alignment, owners),
            _Heads([on_device(heads.task)], params.head_alignment))


@dataclass
class _Side:
    """One side of the objective: its inputs, its held-out batch, its teacher's features and the heads it aligns
    through."""

    source: InputSource
    hold: torch.Tensor
    teacher: _TeacherFeatures
    heads: _Heads

    def loss(self, features: torch.Tensor, index: torch.Tensor, blur: float) -> torch.Tensor:
        """The Sinkhorn divergence from θ_M's features of the inputs `index` to the teacher's, plus the heads'
        term when the side has heads."""
        teacher = self.teacher.take(index)
        loss = sinkhorn_divergence(features, teacher, blur)
        if not self.heads.heads:
            return loss
        tasks = None if self.source.tasks is None else self.source.tasks[index].to(features.device)
        return loss + self.heads.divergence(features, teacher, tasks)


# A sigmoid mask starts from this logit (mask 0.95): at 1 exactly the logit would be infinite.
SIGMOID_START = 3.0


def mask_shape(t: torch.Tensor, granularity: str) -> tuple[int, ...]:
    """The shape of a tensor's mask, broadcast against it: the tensor's own (element), one value per output row of
    a 2-D weight (row), else one value for the whole tensor."""
    if granularity == "element":
        return tuple(t.shape)
    if granularity == "row" and t.ndim == 2:
        return (t.shape[0], 1)
    return (1,) * t.ndim


class _TaskVector:
    """scale·(x − θ0), tensor by tensor. On the CPU, where x and θ0 are already held in float32, each tensor is
    computed when it is used and the step holds no copy of the vector; on another device it is stored there, in
    the forward's dtype."""

    def __init__(self, x: Tensors, theta0: Tensors, scale: float, device: torch.device, dtype: torch.dtype):
        self.x, self.theta0, self.scale = x, theta0, scale
        self.stored = None if device.type == "cpu" else {
            k: to_device((x[k] - theta0[k]).mul_(scale), device, dtype) for k in theta0}

    def __getitem__(self, k: str) -> torch.Tensor:
        if self.stored is not None:
            return self.stored[k]
        return (self.x[k] - self.theta0[k]).mul_(self.scale)

    @torch.no_grad()
    def rescale(self, ratio: float) -> None:
        self.scale *= ratio
        for v in (self.stored or {}).values():
            v.mul_(ratio)


class _MaskedTower:
    """θ_M as a function of the two masks, with the masks' optimiser.

    Held for the step: θ_M (one tower of leaves in the forward's dtype, rewritten every iteration), the pre-scaled
    task vectors a = s_pre·τ_pre, b = s_post·τ_post (computed per tensor from the float32 inputs on the CPU, so not
    held there; stored with θ0 in the forward's dtype on another device), the masks' parameters in float32 with
    Adam's moments and gradients, and a bfloat16 copy of the best masks once the held-out loss has improved.
    Element-wise masks make the parameters, moments and gradients several towers' worth; row or tensor masks make
    them negligible beside θ_M (docs/otmf.md, Memory, has the measurements)."""

    def __init__(self, inp: StepInput, params: OTMFParams, scales: tuple[float, float], device: torch.device,
                 dtype: torch.dtype):
        self.family, self.loaded, self.device, self.dtype = inp.family, inp.loaded, device, dtype
        self.bound, self.scales, self.forward_chunk = params.mask_bound, scales, params.forward_chunk
        on_cpu = device.type == "cpu"  # θ0 in float32 as read: the composition casts to the forward's dtype
        self.theta0 = {k: v if on_cpu else to_device(v, device, dtype) for k, v in inp.base.items()}
        self.a = _TaskVector(inp.merged, inp.base, scales[0], device, dtype)
        self.b = _TaskVector(inp.task, inp.base, scales[1], device, dtype)
        start = SIGMOID_START if self.bound == "sigmoid" else 1.0

        def parameters() -> Tensors:
            return {k: torch.full(mask_shape(v, params.mask_granularity), start, dtype=torch.float32, device=device,
                                  requires_grad=True) for k, v in self.theta0.items()}

        self.p_pre, self.p_post = parameters(), parameters()
        self.opt = torch.optim.Adam([*self.p_pre.values(), *self.p_post.values()], lr=params.lr)
        self.tower: Tensors | None = None  # θ_M, allocated once and rewritten (see `compose`)
        self.trained: dict[str, Tensors] = {}  # the masks the running backward pass trains, by side

    def spare(self) -> Tensors | None:
        """θ_M's tensors once training is over, when they are float32 on the CPU: the new head's own shape and
        place, so it is written there rather than beside them."""
        if self.tower is None or self.dtype != torch.float32 or self.device.type != "cpu":
            return None
        return {k: w.detach() for k, w in self.tower.items()}

    def _ratios(self, scales: tuple[float, float]) -> tuple[float, float]:
        """What the prescaled a, b are multiplied by to stand for the blend at `scales` (1, 1 at the tower's own)."""
        return scales[0] / self.scales[0], scales[1] / self.scales[1]

    def _constant_masks(self, scales: tuple[float, float]) -> tuple[Tensors, Tensors]:
        """Constant masks that turn the prescaled a, b into the blend at `scales`."""
        pre, post = self._ratios(scales)
        return ({k: torch.tensor(pre, device=self.device) for k in self.theta0},
                {k: torch.tensor(post, device=self.device) for k in self.theta0})

    def rescale(self, scales: tuple[float, float]) -> None:
        """Move the prescaled task vectors to other scales, before any training."""
        pre, post = self._ratios(scales)
        self.a.rescale(pre)
        self.b.rescale(post)
        self.scales = scales

    def _mask(self, p: Tensors) -> Tensors:
        return {k: torch.sigmoid(v) for k, v in p.items()} if self.bound == "sigmoid" else p

    @torch.no_grad()
    def _fixed(self, p: Tensors) -> Tensors:
        return {k: v.detach() for k, v in self._mask(p).items()}

    def masks(self) -> tuple[Tensors, Tensors]:
        """The current (M_pre, M_post), not tracked by autograd."""
        return self._fixed(self.p_pre), self._fixed(self.p_post)

    @torch.no_grad()
    def compose(self, m_pre: Tensors, m_post: Tensors) -> Tensors:
        """θ_M written into the step's one tower of leaf tensors: a fresh tower per iteration would leave the
        allocator holding several. Each leaf's gradient becomes the trained masks' as soon as backward has produced
        it (`_to_mask_grads`)."""
        if self.tower is None:
            self.tower = {k: torch.empty(v.shape, dtype=self.dtype, device=self.device) for k, v in self.theta0.items()}
            # The hooks reach this object through a weak reference: autograd holds them where Python's cycle
            # collector cannot see, so a strong one would keep the tower, the masks and Adam's moments alive after
            # the step (a process running step after step grew by all of them each time).
            ref = weakref.ref(self)
            for k, w in self.tower.items():
                w.requires_grad_(True)
                w.register_post_accumulate_grad_hook(lambda w, k=k: ref()._to_mask_grads(w, k))
        return compose(self.theta0, self.a, self.b, m_pre, m_post, self.dtype, out=self.tower)

    def features(self, tower: Tensors, source: InputSource, index: torch.Tensor) -> torch.Tensor:
        return self.family.features(self.loaded, tower, source.batch(index, self.device, self.dtype)).float()  # [B, D]

    def train_iteration(self, side: _Side, index: torch.Tensor, *, train_pre: bool, blur: float) -> float:
        """One Adam step on one mask (M_pre or M_post) against `side`'s teacher; the other mask is a constant (its
        grad stays None, and Adam skips it). Returns the batch's loss."""
        tower = self._differentiable_tower({"pre": self.p_pre} if train_pre else {"post": self.p_post})
        (loss,) = self._step(tower, [(side, index)], blur)
        return loss

    def train_joint(self, pre: _Side, post: _Side, pre_index: torch.Tensor, post_index: torch.Tensor, *,
                    blur: float) -> dict[str, float]:
        """One Adam step on both masks against the sum of both sides' losses, the objective the held-out check
        scores. Returns each side's loss."""
        tower = self._differentiable_tower({"pre": self.p_pre, "post": self.p_post})
        pre_loss, post_loss = self._step(tower, [(pre, pre_index), (post, post_index)], blur)
        return {"pre": pre_loss, "post": post_loss}

    def _backward(self, tower: Tensors, side: _Side, index: torch.Tensor, blur: float) -> float:
        """`side`'s loss at θ_M, back-propagated into the trained masks' gradients; returns its value.

        With `forward_chunk` smaller than the batch, the batch's features are computed without a graph, the loss's
        gradient is taken at them, and each chunk of inputs then runs forward and backward on its share of that
        gradient: the activations of one chunk at a time, for one more forward of the batch."""
        chunk = self.forward_chunk
        if chunk is None or index.shape[0] <= chunk:
            loss = side.loss(self.features(tower, side.source, index), index, blur)
            loss.backward()
            return loss.item()
        parts = index.split(chunk)
        with torch.no_grad():
            features = torch.cat([self.features(tower, side.source, part) for part in parts])
        features.requires_grad_(True)
        loss = side.loss(features, index, blur)
        (grad,) = torch.autograd.grad(loss, features)
        for part, part_grad in zip(parts, grad.split(chunk), strict=True):
            self.features(tower, side.source, part).backward(part_grad)
        return loss.item()

    def _differentiable_tower(self, trained: dict[str, Tensors]) -> Tensors:
        """θ_M at the current masks, as leaf tensors whose gradient, as soon as backward has produced it, becomes
        the `trained` masks' gradient (∂L/∂M = Σ ∂L/∂θ_M ⊙ a, summed over the mask's broadcast dimensions) and is
        freed.

        Autograd through the composition would keep the gradient of every tensor of θ_M until the end of backward
        (the composition's nodes run last): a whole tower more of memory. A leaf's gradient is accumulated the
        moment it is computed, so the hook holds one tensor's gradient at a time."""
        self.trained = trained
        return self.compose(*self.masks())

    def _to_mask_grads(self, w: torch.Tensor, key: str) -> None:
        """Each trained mask parameter's gradient from θ_M's tensor `key` (the scaled task vector's tensor is only
        computed here)."""
        assert w.grad is not None
        grad = w.grad.float()
        w.grad = None
        scaled = {"pre": self.a, "post": self.b}
        for side, masks in self.trained.items():
            p = masks[key]
            g = (grad * scaled[side][key]).sum_to_size(p.shape)
            if self.bound == "sigmoid":  # ∂M/∂logit = M (1 − M)
                m = torch.sigmoid(p.detach())
                g = g * m * (1.0 - m)
            p.grad = g if p.grad is None else p.grad + g

    def _step(self, tower: Tensors, sides: list[tuple[_Side, torch.Tensor]], blur: float) -> list[float]:
        """One Adam step on the sum of the `sides`' losses (each a side and its batch), each computed and
        back-propagated in turn: the masks' gradients add up the same, and backward never holds θ_M's gradients for
        long. (Through one graph of two forwards, each θ_M tensor's gradient would wait for the other forward's
        before reaching its hook: a tower's worth.) Returns each side's loss."""
        self.opt.zero_grad(set_to_none=True)
        values = [self._backward(tower, side, index, blur) for side, index in sides]
        self.opt.step()
        if self.bound == "clamp":
            with torch.no_grad():
                for masks in self.trained.values():
                    for v in masks.values():
                        v.clamp_(0.0, 1.0)
        return values

    @torch.no_grad()
    def held_out_loss(self, pre: _Side, post: _Side, same_data: bool, blur: float, *,
                      blend: tuple[float, float] | None = None) -> float:
        """The loss on the held-out batches of the current masks, or of the blend at scales `blend` (no masks)."""
        tower = self.compose(*self._constant_masks(blend)) if blend is not None else self.compose(*self.masks())
        f_pre = self.features(tower, pre.source, pre.hold)
        f_post = f_pre if same_data else self.features(tower, post.source, post.hold)
        return (pre.loss(f_pre, pre.hold, blur) + post.loss(f_post, post.hold, blur)).item()


# The held-out loss is a sum of Sinkhorn divergences, each a difference of three float32 transport costs of order
# one on unit-norm features: a change below this is rounding (two identical clouds score ±1e-7), not an improvement.
LOSS_RESOLUTION = 1e-6


class _BestMasks:
    """The masks with the lowest held-out loss so far; `pre` and `post` stay None while the initial all-ones masks
    are the best."""

    def __init__(self, initial_loss: float):
        self.loss, self.iteration = initial_loss, 0
        self.pre: Tensors | None = None
        self.post: Tensors | None = None

    @torch.no_grad()
    def offer(self, loss: float, iteration: int, m_pre: Tensors, m_post: Tensors) -> None:
        if not loss < self.loss - LOSS_RESOLUTION:  # also refuses a NaN loss
            return
        self.loss, self.iteration = loss, iteration
        # bfloat16 keeps each mask within 0.4% for half the memory of a float32 copy: the copies would otherwise be
        # the step's largest item after Adam's moments.
        if self.pre is None or self.post is None:
            self.pre = {k: v.detach().to(torch.bfloat16) for k, v in m_pre.items()}
            self.post = {k: v.detach().to(torch.bfloat16) for k, v in m_post.items()}
            return
        for k in m_pre:
            self.pre[k].copy_(m_pre[k])
            self.post[k].copy_(m_post[k])
