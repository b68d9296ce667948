"""Compose-time calibration: re-solve the members' trained factors so that their sum does, on
every member's inputs, what that member alone did there.

Disjoint regions keep weights apart, not skills: on task i's inputs ``x_i`` a composition adds
``Σ_j ΔW_j x_i``, not ``ΔW_i x_i``. Per module, with ``G_i = E[x_i x_iᵀ]`` the second moment of
task i's inputs (over its probe set's tokens, read by the base) and each task weighted equally,
``lsq`` solves the least-squares problem

    min over the members' factors   Σ_i E‖ Σ_j ΔW'_j x_i − ΔW_i x_i ‖²

with every member kept on its own region, in closed form (RegMean restricted to the regions):

- FA (member j owns columns ``idx_j``; ``ΔW_j x = s_j B_j x[idx_j]``): stacking the members'
  columns ``c = ∪ idx_j``, ``[s_1 B'_1 … s_k B'_k] (Σ_i G_i[c,c]) = Σ_i s_i B_i G_i[idx_i, c]``;
  one member's columns may cancel what another writes into a task.
- FB (member j owns rows ``idx_j``; ``ΔW_j x = s_j E_j A_j x``): rows are not shared, so each
  member alone: ``A'_j (Σ_i G_i) = A_j G_j``.

With one member the factors come back unchanged; with tasks whose inputs never reach each
other's regions, unchanged up to rounding. A tiny ridge (``RIDGE`` of the mean diagonal, solved
in float64) keeps the solve defined where the probe tokens span fewer directions than the
region has; directions no probe token visits get no update.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sbora_reg.errors import ConfigError
from sbora_reg.sbora.activations import module_inputs
from sbora_reg.sbora.adapter import Adapter, AdapterModule, stack_modules, unstack
from sbora_reg.sbora.layer import is_adapter_param

METHODS = ("none", "lsq", "match", "tune")
MATCH_ROUNDS = 3
RIDGE = 1e-8
PRIOR = 0.0  # ε of lsq: how strongly each factor is held to its trained value (measured best)
MATCH_PRIOR = 1.0  # ε of match, which without it runs away from the data (measured)
# chosen on benchmarks/interference.py; steps per member (each example seen ~6 times)
TUNE_STEPS_PER_MEMBER, TUNE_LR, TUNE_BATCH = 100, 1e-3, 16
TUNE_EVERY_POSITION, TUNE_HIDDEN = 1.0, 1.0  # weights of tune's prompt-position and hidden terms
TUNE_BALANCE = 0.0  # exponent of tune's member sampling on running loss (0: every row alike)


@dataclass(frozen=True)
class Moments:
    """Second moment of one task's inputs to one module, on ``columns`` (None: all of them)."""

    columns: torch.Tensor | None  # sorted int64 input indices, or None for every input
    gram: torch.Tensor  # (c, c) float64, E[x[c] x[c]ᵀ] over the task's tokens
    tokens: int


def region_columns(adapters: Sequence[Adapter]) -> dict[str, torch.Tensor | None]:
    """Per module, the input columns calibration needs: the union of the FA members' indices,
    or None (every column) where an FB member reads the whole input."""
    need: dict[str, list[AdapterModule]] = {}
    for adapter in adapters:
        for name, module in adapter.modules.items():
            need.setdefault(name, []).append(module)
    out: dict[str, torch.Tensor | None] = {}
    for name, mods in need.items():
        variants = {m.variant for m in mods}
        if variants not in ({"fa"}, {"fb"}):
            raise ConfigError(
                f"module {name} mixes {', '.join(sorted(variants))} members: calibration solves "
                "SBoRA members of one variant per module"
            )
        if variants == {"fa"}:
            out[name] = torch.unique(torch.cat([_indices(m) for m in mods]))
        else:
            out[name] = None
    return out


def capture_moments(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    columns: Mapping[str, torch.Tensor | None],
) -> dict[str, Moments]:
    """``Moments`` of the inputs every module in ``columns`` receives on ``examples``."""
    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str, rows: torch.Tensor) -> None:
        cols = columns[name]
        x = (rows if cols is None else rows[:, cols]).double()
        sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x

    tokens = module_inputs(model, tokenizer, examples, sorted(columns), accumulate)
    if tokens == 0:
        raise ConfigError("calibration read no tokens: the probe set is empty")
    return {name: Moments(columns[name], gram / tokens, tokens) for name, gram in sums.items()}


def calibrate(
    adapters: Sequence[Adapter],
    moments: Sequence[Mapping[str, Moments]],
    prior: float | None = None,
) -> list[Adapter]:
    """The members with their factors re-solved by ``lsq`` (see the module docstring).

    ``moments[i]`` are task i's (``capture_moments`` with ``region_columns(adapters)``). Indices,
    scales, configs and everything else stay as they were; the inputs are not modified.
    """
    if len(adapters) != len(moments):
        raise ConfigError("calibration needs the inputs of every member's task")
    columns = region_columns(adapters)
    out = [copy.deepcopy(a) for a in adapters]
    if len(adapters) < 2:
        return out  # one task: its own update is already exact
    for name, cols in sorted(columns.items()):
        owners = [j for j, a in enumerate(adapters) if name in a.modules]
        if any(name not in m for m in moments):
            raise ConfigError(f"calibration has no inputs of module {name} for every task")
        grams = [m[name].gram for m in moments]
        total = sum(grams[1:], grams[0].clone())
        weight = (PRIOR if prior is None else prior) * torch.diag(torch.diagonal(total))
        system = _ridged(total + weight)
        if cols is None:  # FB: A'_j (Σ G + εD) = A_j (G_j + εD), member by member
            for j in owners:
                a = _factor(adapters[j].modules[name])
                solved = torch.linalg.solve(system, (grams[j] + weight) @ a.T.double()).T
                out[j].modules[name].a = solved.to(a.dtype).contiguous()
            continue
        # FA: S (Σ G + εD) = Σ_i s_i B_i G_i[idx_i, :] + ε T D in the frame of cols, with
        # S = [s_1 B'_1 … s_k B'_k] and T the same of the members' own factors
        pos = {j: torch.searchsorted(cols, _indices(adapters[j].modules[name])) for j in owners}
        out_dim = adapters[owners[0]].modules[name].shape[0]
        own = torch.zeros(out_dim, len(cols), dtype=torch.float64)
        rhs = torch.zeros_like(own)
        for j in owners:
            module = adapters[j].modules[name]
            part = module.scale * _factor(module).double()
            own[:, pos[j]] = part
            rhs += part @ grams[j][pos[j]]
        rhs += own @ weight
        stacked = torch.linalg.solve(system, rhs.T).T  # (out, c) = s·B' on every column
        for j in owners:
            module = out[j].modules[name]
            b = _factor(adapters[j].modules[name])
            module.b = (stacked[:, pos[j]] / module.scale).to(b.dtype).contiguous()
    return out


def objective(
    adapters: Sequence[Adapter], moments: Sequence[Mapping[str, Moments]], module: str,
    reference: Sequence[Adapter] | None = None,
) -> float:  # fmt: skip
    """``Σ_i E‖Σ_j ΔW_j x_i − ΔW^ref_i x_i‖²`` at one module, from the moments (dense ΔW):
    what ``calibrate`` minimises, with ``reference`` the members before calibration."""
    reference = adapters if reference is None else reference
    total = 0.0
    for i, m in enumerate(moments):
        cols, gram = m[module].columns, m[module].gram
        err = sum(a.delta(module).double() for a in adapters if module in a.modules)
        if module in reference[i].modules:
            err = err - reference[i].delta(module).double()
        assert isinstance(err, torch.Tensor)
        sub = err if cols is None else err[:, cols]
        total += float(torch.trace(sub @ gram @ sub.T))
    return total


def _ridged(gram: torch.Tensor) -> torch.Tensor:
    diag = torch.diagonal(gram)
    eps = RIDGE * float(diag.mean()) if diag.numel() else 0.0
    return gram + torch.eye(gram.shape[0], dtype=gram.dtype) * max(eps, 1e-12)


def _indices(m: AdapterModule) -> torch.Tensor:
    if m.indices is None:
        raise ConfigError(f"{m.name} is a plain LoRA module: calibration needs SBoRA members")
    return m.indices


def _factor(m: AdapterModule) -> torch.Tensor:
    return m.factor.detach()


# ---- tune: lsq, then a few steps of distillation through the whole composed model -----------


def tune(
    model: nn.Module,
    tokenizer: Any,
    adapters: Sequence[Adapter],
    sets: Sequence[Sequence[Any]],
    *,
    start: Sequence[Adapter] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = TUNE_BATCH,
    every_position: float = TUNE_EVERY_POSITION,
    hidden: float = TUNE_HIDDEN,
    balance: float | None = None,
    seed: int = 0,
) -> list[Adapter]:
    """The members' factors trained together, on their own regions, so that the composed model
    does on task i's examples ``sets[i]`` what member i alone does there.

    ``lsq`` corrects each module to first order from the base's activations; the errors that
    compound through the layers it cannot see. ``tune`` starts from ``start`` (the ``lsq``
    solution) and takes ``steps`` (default ``TUNE_STEPS_PER_MEMBER`` per member) of AdamW, with
    the training loop's schedule, on every task's examples (teacher forced; member i alone is
    the teacher of task i's examples), minimising

        KL(teacher ‖ composed) on the answer tokens
        + every_position · KL(teacher ‖ composed) at every position, prompt included
        + hidden · Σ_layers ‖h_composed − h_teacher‖² / ‖h_teacher‖², at every token

    each of the last two a mean per example. With ``balance`` b > 0 (default ``TUNE_BALANCE``)
    each slot of a batch goes to member i with probability ∝ (its running loss)^b, so the
    members the composition serves worst get the steps (see ``_Sampler``). The prompt
    positions and the hidden states carry far more signal per example than the few answer
    tokens (measured in
    ``benchmarks/interference.py``, seed 0, three skills, 150 steps: sorting kept 0.93 of its
    exact match with the answer term alone, 0.96 with all three, at the same cost per step).
    Memory: the teacher's log-probabilities at every position
    (positions × vocabulary floats per example) and hidden states (positions × layers × width)
    are kept for every example. Only the factors change; ``model`` (the plain base) is returned
    to its state.
    """
    from sbora_reg.sbora.model import apply_adapter, extract, unload
    from sbora_reg.sbora.training import cosine_schedule, encode

    if len(adapters) != len(sets):
        raise ConfigError("tuning needs the examples of every member's task")
    begin = list(start) if start is not None else list(adapters)
    steps = TUNE_STEPS_PER_MEMBER * len(adapters) if steps is None else steps
    device = next(model.parameters()).device
    rows = [(i, ex) for i, examples in enumerate(sets) for ex in examples]
    balance = TUNE_BALANCE if balance is None else balance
    lr = TUNE_LR if lr is None else lr  # read here, so that a benchmark can set the constants
    sampler = _Sampler([len(examples) for examples in sets], batch_size, steps, seed, balance)
    teachers: list[_Teacher] = []
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            apply_adapter(model, adapter).eval()
            for ex in sets[i]:
                teachers.append(_Teacher.read(model, encode(tokenizer, [ex], device), hidden > 0))
            unload(model)
    stacked = _stack(begin, sorted({n for a in begin for n in a.modules}))
    for p in model.parameters():
        p.requires_grad_(False)
    apply_adapter(model, stacked)
    try:
        params = [p for n, p in model.named_parameters() if is_adapter_param(n)]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, warmup=3))
        model.train()
        for _ in range(steps):
            batch = sampler.next()
            enc = encode(tokenizer, [rows[k][1] for k in batch], device)
            loss, each = _tune_loss(
                model, enc, [teachers[k] for k in batch], every_position, hidden
            )
            sampler.observe([rows[k][0] for k in batch], each.detach().cpu())
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        trained = extract(model)
    finally:
        unload(model)
    return _unstack_all(trained, adapters)


@dataclass(frozen=True)
class _Teacher:
    """What member i alone does on one example: log-probabilities at every position (the
    answer positions marked) and, when asked, every layer's hidden state."""

    logprobs: torch.Tensor  # (positions, vocab)
    answer: torch.Tensor  # (positions,) bool: the position predicts an answer token
    hidden: torch.Tensor | None  # (tokens, layers, width)

    @staticmethod
    def read(model: nn.Module, enc: dict[str, torch.Tensor], hidden: bool) -> _Teacher:
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    output_hidden_states=hidden)  # fmt: skip
        states = torch.stack(out.hidden_states[1:], dim=2)[0].float() if hidden else None
        return _Teacher(
            torch.log_softmax(out.logits[0, :-1].float(), dim=-1),
            enc["labels"][0, 1:] != -100,
            states,
        )


def _tune_loss(
    model: nn.Module,
    enc: dict[str, torch.Tensor],
    teachers: Sequence[_Teacher],
    every_position: float,
    hidden: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tune``'s objective on one right-padded batch (see there), and its value per example
    (the answer term as a mean per example) for ``_Sampler``."""
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                output_hidden_states=hidden > 0)  # fmt: skip
    real = enc["attention_mask"].bool()
    positions = real[:, 1:]  # position t predicts token t + 1, a real token
    student = torch.log_softmax(out.logits[:, :-1][positions].float(), dim=-1)
    teacher = torch.cat([t.logprobs for t in teachers])
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # per position, KL(teacher ‖ student)
    answer = torch.cat([t.answer for t in teachers])
    loss = kl[answer].mean()
    n = len(teachers)
    row = torch.repeat_interleave(torch.arange(n), positions.sum(1).cpu()).to(kl.device)
    each = _row_means(kl[answer], row[answer], n)
    if every_position:
        at_every = _row_means(kl, row, n)
        loss = loss + every_position * at_every.mean()
        each = each + every_position * at_every
    if hidden:
        states = torch.stack(out.hidden_states[1:], dim=2)[real].float()  # (tokens, L, d)
        want = torch.cat([t.hidden for t in teachers if t.hidden is not None])
        rel = (states - want).pow(2).sum(-1) / want.pow(2).sum(-1).clamp_min(1e-6)
        row = torch.repeat_interleave(torch.arange(n), real.sum(1).cpu()).to(rel.device)
        per_layer = _row_means(rel.mean(-1), row, n)
        loss = loss + hidden * per_layer.mean()
        each = each + hidden * per_layer
    return loss, each


def _row_means(values: torch.Tensor, row: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of ``values`` per example, ``row`` naming each value's example."""
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, row, values)
    counts = torch.bincount(row, minlength=n).to(values.dtype)
    return sums / counts.clamp_min(1)  # an example of one token has no position: 0, not NaN


class _Sampler:
    """The example indices (into the members' sets, concatenated) of each step of ``tune``.

    ``balance`` 0: a seeded shuffle of every row, epoch after epoch (each member in proportion
    to its examples). ``balance`` b > 0: each slot of a batch goes to member i with probability
    ∝ ``loss_i ** b``, ``loss_i`` the running mean (0.8/0.2 per step it appears in) of
    ``tune``'s objective on its examples (a member not yet seen counts as the worst seen), and
    then to that member's next example in its own seeded shuffle.
    """

    def __init__(
        self, sizes: Sequence[int], batch_size: int, steps: int, seed: int, balance: float
    ) -> None:
        from sbora_reg.sbora.training import global_batches

        self.balance, self.batch_size = balance, batch_size
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = list(sizes)
        self.gen = torch.Generator().manual_seed(seed)
        self.running = torch.full((len(sizes),), float("nan"), dtype=torch.float64)
        self.uniform = iter(
            global_batches(sum(sizes), batch_size, seed=seed, steps=steps, epochs=1)
        )
        self.orders = [torch.randperm(n, generator=self.gen).tolist() for n in sizes]
        self.taken = [0] * len(sizes)

    def weights(self) -> torch.Tensor:
        seen = self.running[~self.running.isnan()]
        worst = float(seen.max()) if seen.numel() else 1.0
        loss = torch.where(self.running.isnan(), torch.tensor(worst, dtype=torch.float64),
                           self.running)  # fmt: skip
        w = loss.clamp_min(1e-12).pow(self.balance) * (torch.tensor(self.sizes) > 0)
        return w / w.sum()

    def next(self) -> list[int]:
        if not self.balance:
            return next(self.uniform)
        members = torch.multinomial(self.weights(), self.batch_size, True, generator=self.gen)
        batch = []
        for i in members.tolist():
            if self.taken[i] == len(self.orders[i]):  # this member's epoch is over: reshuffle
                self.orders[i] = torch.randperm(self.sizes[i], generator=self.gen).tolist()
                self.taken[i] = 0
            batch.append(self.starts[i] + self.orders[i][self.taken[i]])
            self.taken[i] += 1
        return batch

    def observe(self, members: Sequence[int], losses: torch.Tensor) -> None:
        """The objective's value on each example of the step just taken."""
        for i in set(members):
            mean = float(losses[[k for k, m in enumerate(members) if m == i]].mean())
            old = float(self.running[i])
            self.running[i] = mean if old != old else 0.8 * old + 0.2 * mean


# ---- match: least squares against each member alone, through the composed model, iterated ----


def match(
    model: nn.Module,
    tokenizer: Any,
    adapters: Sequence[Adapter],
    sets: Sequence[Sequence[Any]],
    *,
    start: Sequence[Adapter] | None = None,
    rounds: int = MATCH_ROUNDS,
    prior: float = MATCH_PRIOR,
    batch_size: int = 16,
) -> list[Adapter]:
    """``lsq`` with the errors that compound through the layers taken into account.

    ``lsq`` asks every module to reproduce ``ΔW_i x_i`` on the *base's* activations; in the
    composition each module sees activations the other members (and the layers below) already
    moved. ``match`` asks each module of the composed model to output, on task i's tokens, what
    the same module outputs in member i alone, given the activations it really receives:

        min over the stacked factor F   Σ_i E‖ W0 x̃_i + F x̃_i[c] − y_i ‖²

    with ``x̃_i`` the module's input in the current composed model, ``y_i`` its output in the
    base with member i alone (same tokens, teacher forced) and each task weighted equally;
    closed form per module (``F (Σ G_i) = Σ E[(y_i − W0 x̃_i) x̃_i[c]ᵀ]``; FB: on the members'
    rows, with the whole input), all modules at once, then again from the new composition,
    ``rounds`` times; each solve is held near the factor it starts from by ``prior`` (ε, times
    the moments' diagonal), without which the iteration runs away. With one member it returns
    the member. ``model`` (the plain base) is left as it was.
    """
    from sbora_reg.sbora.model import apply_adapter, unload

    if len(adapters) != len(sets):
        raise ConfigError("calibration needs the examples of every member's task")
    current = [copy.deepcopy(a) for a in (start if start is not None else adapters)]
    if len(adapters) < 2:
        return current
    columns = region_columns(adapters)
    names = sorted(columns)
    for _ in range(rounds):
        stacked = _stack(current, names)
        grams: dict[str, torch.Tensor] = {}
        cross: dict[str, torch.Tensor] = {}
        for i, rows in enumerate(sets):
            apply_adapter(model, adapters[i])
            teacher = _outputs(model, tokenizer, rows, names, batch_size)
            unload(model)
            apply_adapter(model, stacked)
            g, r = _student_moments(model, tokenizer, rows, names, columns, teacher, batch_size)
            unload(model)
            for name in names:
                grams[name] = grams[name] + g[name] if name in grams else g[name]
                cross[name] = cross[name] + r[name] if name in cross else r[name]
        for name in names:  # F (Σ G + εD) = Σ R + ε F_now D: held near where it stands
            module = stacked.modules[name]
            now = module.factor.double()
            weight = prior * torch.diagonal(grams[name])
            rhs = cross[name] + now * weight  # (·, c) * (c,): F_now D
            solved = torch.linalg.solve(_ridged(grams[name] + torch.diag(weight)), rhs.T).T
            if module.variant == "fa":
                module.b = solved.float().contiguous()  # (out, c) = s·B on every column
            else:
                module.a = solved.float().contiguous()  # (u, in) = s·A on every member row
        current = _unstack_all(stacked, current)
    return current


def _stack(adapters: Sequence[Adapter], names: Sequence[str]) -> Adapter:
    return Adapter(
        adapters[0].config,
        {n: stack_modules(n, [a.modules[n] for a in adapters if n in a.modules]) for n in names},
    )


def _unstack_all(stacked: Adapter, like: Sequence[Adapter]) -> list[Adapter]:
    out = [copy.deepcopy(a) for a in like]
    for adapter in out:
        for name, module in adapter.modules.items():
            factor = unstack(stacked.modules[name], module)
            if module.variant == "fa":
                module.b = factor
            else:
                module.a = factor
    return out


def _batches(
    tokenizer: Any, rows: Sequence[Any], batch_size: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    from sbora_reg.sbora.scoring import batches
    from sbora_reg.sbora.training import encode

    return [encode(tokenizer, b, device) for b in batches(rows, batch_size)]


def _outputs(
    model: nn.Module, tokenizer: Any, rows: Sequence[Any], names: Sequence[str], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Per batch, every named module's output rows (real tokens only)."""
    found: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    module_inputs(model, tokenizer, rows, names, lambda n, r: found[n].append(r.double()),
                  batch_size, outputs=True)  # fmt: skip
    return [{n: found[n][b] for n in names} for b in range(len(found[names[0]]))]


@torch.no_grad()
def _student_moments(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Any],
    names: Sequence[str],
    columns: Mapping[str, torch.Tensor | None],
    teacher: Sequence[Mapping[str, torch.Tensor]],
    batch_size: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per module, ``E[z zᵀ]`` and ``E[(y − W0 x̃) zᵀ]`` over one task's tokens, with ``z`` the
    stacked factor's input (``x̃[c]`` for FA, ``x̃`` for FB) and the target restricted to the
    members' rows for FB."""
    device = next(model.parameters()).device
    grams: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}

    def pre(name: str) -> Any:
        def grab(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            state[name] = args[0].detach()[state["mask"]].double()

        return grab

    def base_out(name: str, rows_of: torch.Tensor) -> Any:
        def grab(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
            x = state.pop(name)
            target = state["teacher"][name] - out.detach()[state["mask"]].double()  # y − W0 x̃
            cols = columns[name]
            if cols is None:  # FB: the members' rows of the target, the whole input
                target = target[:, rows_of]
                z = x
            else:
                z = x[:, cols]
            g, r = z.T @ z, target.T @ z
            grams[name] = grams[name] + g if name in grams else g
            cross[name] = cross[name] + r if name in cross else r

        return grab

    handles = []
    for n in names:
        layer = model.get_submodule(n)
        handles.append(layer.register_forward_pre_hook(pre(n)))
        inner = layer.get_submodule("base_layer")  # the plain layer inside the SBoRA wrapper
        handles.append(inner.register_forward_hook(base_out(n, layer.get_buffer("sbora_idx"))))
    tokens = 0
    try:
        model.eval()
        for enc, want in zip(_batches(tokenizer, rows, batch_size, device), teacher, strict=True):
            state["mask"], state["teacher"] = enc["attention_mask"].bool(), want
            tokens += int(state["mask"].sum())
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return (
        {n: g / tokens for n, g in grams.items()},
        {n: r / tokens for n, r in cross.items()},
    )
