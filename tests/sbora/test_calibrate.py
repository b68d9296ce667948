"""Compose-time calibration (``lsq``) against a dense least-squares reference.

The reference solves the same problem from the raw activations, not from their moments:
``min Σ_i (1/N_i) ‖X_i ΔWᵀ − X_i ΔW_iᵀ‖²`` over the stacked regional factors, by
``torch.linalg.lstsq`` on the weighted rows. Tolerances: both solve in float64 from float32
data; the ridge (1e-8 of the mean diagonal) moves the solution by about ridge × condition
number (< 1e-6 for these well-conditioned random inputs); the factors are stored as float32
(relative rounding 2^-24).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sbora_reg.sbora import Adapter, AdapterModule, SBoRAConfig
from sbora_reg.sbora.activations import module_inputs
from sbora_reg.sbora.calibrate import Moments, calibrate, capture_moments, objective, region_columns

OUT, IN = 7, 12
RTOL = 1e-5


def _adapter(variant: str, idx: list[int], seed: int, scale: float = 0.5) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    r = len(idx)
    a = torch.randn(r, IN, generator=gen) if variant == "fb" else None
    b = torch.randn(OUT, r, generator=gen) if variant == "fa" else None
    module = AdapterModule("m", variant, "linear", (OUT, IN), scale, torch.tensor(idx), a, b)
    config = SBoRAConfig(variant=variant, r=r, alpha=scale * r, target_modules=("m",))
    return Adapter(config, {"m": module})


def _moments(xs: list[torch.Tensor], cols: torch.Tensor | None) -> list[dict[str, Moments]]:
    out = []
    for x in xs:
        sub = (x if cols is None else x[:, cols]).double()
        out.append({"m": Moments(cols, sub.T @ sub / x.shape[0], x.shape[0])})
    return out


def _reference(adapters: list[Adapter], xs: list[torch.Tensor]) -> torch.Tensor:
    """The summed ΔW (out, in) of the calibrated members, solved densely on the raw rows."""
    variant = adapters[0].modules["m"].variant
    rows, targets = [], []
    for i, x in enumerate(xs):
        w = x.shape[0] ** -0.5
        rows.append(w * x.double())
        targets.append(w * x.double() @ adapters[i].delta("m").double().T)
    x_all, y_all = torch.cat(rows), torch.cat(targets)
    if variant == "fa":  # ΔW = S on the union of columns
        cols = torch.unique(torch.cat([a.modules["m"].indices for a in adapters]))
        s = torch.linalg.lstsq(x_all[:, cols], y_all).solution.T  # (out, c)
        full = torch.zeros(OUT, IN, dtype=torch.float64)
        full[:, cols] = s
        return full
    full = torch.zeros(OUT, IN, dtype=torch.float64)  # FB: each member's rows on their own
    for a in adapters:
        idx = a.modules["m"].indices
        full[idx] = torch.linalg.lstsq(x_all, y_all[:, idx]).solution.T
    return full


def _inputs(seed: int, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # tasks that share a common direction (the mean) and differ elsewhere, as activations do
    common = torch.randn(IN, generator=gen)
    return [torch.randn(n, IN, generator=gen) + 2 * common for n in sizes]


def test_fa_calibration_is_the_dense_least_squares_solution() -> None:
    members = [_adapter("fa", [0, 3, 4], 1), _adapter("fa", [1, 7], 2, 2.0),
               _adapter("fa", [9, 10, 11, 5], 3)]  # fmt: skip
    xs = _inputs(4, (40, 25, 60))
    moments = _moments(xs, region_columns(members)["m"])
    solved = calibrate(members, moments, prior=0.0)
    total = sum(a.delta("m").double() for a in solved)
    want = _reference(members, xs)
    assert torch.allclose(total, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))
    # regions, scales and the inputs themselves are untouched
    for before, after in zip(members, solved, strict=True):
        assert torch.equal(before.modules["m"].indices, after.modules["m"].indices)
        assert before.modules["m"].scale == after.modules["m"].scale
        assert after.modules["m"].b.dtype == torch.float32
    assert not torch.equal(members[0].modules["m"].b, solved[0].modules["m"].b)
    # it is a minimum: lower than the plain sum, which has crosstalk here
    assert objective(solved, moments, "m", members) < 0.9 * objective(members, moments, "m")


def test_fb_calibration_is_the_dense_least_squares_solution() -> None:
    members = [_adapter("fb", [0, 2], 5), _adapter("fb", [3, 4, 6], 6, 1.5)]
    xs = _inputs(7, (50, 30))
    solved = calibrate(members, _moments(xs, None), prior=0.0)
    total = sum(a.delta("m").double() for a in solved)
    want = _reference(members, xs)
    assert torch.allclose(total, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))


def test_the_prior_holds_factors_to_their_trained_values() -> None:
    """With ε > 0: ``+ ε Σ_c D_cc ‖S[:, c] − T[:, c]‖²`` (D the summed moments' diagonal) in
    the dense reference, as rows ``sqrt(ε D_cc) e_c`` with targets ``T``; large ε: no change."""
    members = [_adapter("fa", [0, 3, 4], 1), _adapter("fa", [1, 7], 2, 2.0)]
    xs = _inputs(9, (40, 25))
    cols = region_columns(members)["m"]
    moments = _moments(xs, cols)
    eps = 0.5
    solved = calibrate(members, moments, prior=eps)
    diag = torch.diagonal(sum(m["m"].gram for m in moments))
    rows = [x.shape[0] ** -0.5 * x.double()[:, cols] for x in xs]
    targets = [x.shape[0] ** -0.5 * x.double() @ members[i].delta("m").double().T
               for i, x in enumerate(xs)]  # fmt: skip
    own = sum(a.delta("m").double() for a in members)[:, cols]  # T: (out, c)
    rows.append(torch.diag((eps * diag).sqrt()))
    targets.append(torch.diag((eps * diag).sqrt()) @ own.T)
    s = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    total = sum(a.delta("m").double() for a in solved)[:, cols]
    assert torch.allclose(total, s, rtol=RTOL, atol=RTOL * float(s.abs().max()))
    held = calibrate(members, moments, prior=1e9)
    for before, after in zip(members, held, strict=True):
        b0 = before.modules["m"].b
        assert torch.allclose(
            after.modules["m"].b, b0, rtol=1e-6, atol=1e-6 * float(b0.abs().max())
        )


def test_nothing_changes_without_crosstalk_or_with_one_member() -> None:
    members = [_adapter("fa", [0, 1, 2], 1), _adapter("fa", [6, 7], 2)]
    xs = _inputs(8, (30, 30))
    xs[0][:, [6, 7]] = 0  # task 0 never reaches member 1's columns and vice versa
    xs[1][:, [0, 1, 2]] = 0
    solved = calibrate(members, _moments(xs, region_columns(members)["m"]))
    for before, after in zip(members, solved, strict=True):
        b0, b1 = before.modules["m"].b, after.modules["m"].b
        assert torch.allclose(b1, b0, rtol=RTOL, atol=RTOL * float(b0.abs().max()))
    (alone,) = calibrate(members[:1], _moments(xs[:1], region_columns(members[:1])["m"]))
    assert torch.equal(alone.modules["m"].b, members[0].modules["m"].b)


def test_capture_moments_reads_real_tokens_only(tiny_lm_dir) -> None:
    """Moments over a padded batch equal those of the examples read one by one (no padding)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    examples = [("1+1=", "2"), ("12+30=", "42"), ("7+8=", "15")]
    name = "model.layers.0.mlp.up_proj"
    cols = torch.tensor([1, 5, 6])
    got = capture_moments(model, tokenizer, examples, {name: cols})[name]
    rows: list[torch.Tensor] = []
    for ex in examples:
        module_inputs(model, tokenizer, [ex], [name], lambda _n, r: rows.append(r))
    x = torch.cat(rows)[:, cols].double()
    assert got.tokens == x.shape[0]
    assert torch.allclose(got.gram, x.T @ x / x.shape[0], rtol=1e-6, atol=1e-9)


TUNED = ("q_proj", "up_proj")


def _random_members(model, scale: float) -> list[Adapter]:
    """Two FA adapters on disjoint columns of ``TUNED`` with random factors of size ``scale``."""
    from sbora_reg.sbora import inject, unload
    from sbora_reg.sbora.model import extract

    members = []
    names = [n for n, _ in model.named_modules() if n.endswith(TUNED)]
    for seed, idx in ((1, [0, 1, 2, 3]), (2, [8, 9, 10, 11])):
        cfg = SBoRAConfig(variant="fa", r=4, alpha=8, target_modules=TUNED)
        inject(model, cfg, indices={n: idx for n in names})
        adapter = extract(model)
        gen = torch.Generator().manual_seed(seed)
        for module in adapter.modules.values():
            module.b = scale * torch.randn(module.b.shape, generator=gen)
        unload(model)
        members.append(adapter)
    return members


def _stacked(adapters: list[Adapter]) -> Adapter:
    """The adapters' sum as one adapter (what compose merges)."""
    from sbora_reg.sbora.adapter import stack_modules

    names = sorted({n for a in adapters for n in a.modules})
    return Adapter(adapters[0].config, {
        n: stack_modules(n, [a.modules[n] for a in adapters if n in a.modules]) for n in names
    })  # fmt: skip


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return (teacher.exp() * (teacher - student)).sum(-1)


@pytest.mark.parametrize("every_position, hidden", [(0.0, 0.0), (0.5, 2.0)])
def test_tune_loss_is_the_per_example_objective_on_a_padded_batch(
    tiny_lm_dir, every_position: float, hidden: float
) -> None:
    """tune's batched loss (right padding, one teacher per example) equals the objective written
    out one unpadded example at a time: answer-token KL over the batch's answer tokens, plus the
    per-example means of the KL at every position and of the relative hidden-state error."""
    from sbora_reg.sbora import unload
    from sbora_reg.sbora.calibrate import _Teacher, _tune_loss
    from sbora_reg.sbora.model import apply_adapter
    from sbora_reg.sbora.training import encode

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    members = _random_members(model, 0.3)
    rows = [("1+1=", "2"), ("12*3 is", "36 exactly"), ("x", "yz")]  # different lengths
    cpu = torch.device("cpu")
    with torch.no_grad():
        apply_adapter(model, members[0])
        teachers = [_Teacher.read(model, encode(tokenizer, [r], cpu), hidden > 0) for r in rows]
        unload(model)
        apply_adapter(model, members[1])
        got, each = _tune_loss(
            model, encode(tokenizer, rows, cpu), teachers, every_position, hidden
        )
        answer_kl, position_terms, hidden_terms = [], [], []
        for row, t in zip(rows, teachers, strict=True):
            enc = encode(tokenizer, [row], cpu)
            out = model(**{k: enc[k] for k in ("input_ids", "attention_mask")},
                        output_hidden_states=True)  # fmt: skip
            kl = _kl(t.logprobs, torch.log_softmax(out.logits[0, :-1], dim=-1))
            answer_kl.append(kl[enc["labels"][0, 1:] != -100])
            position_terms.append(kl.mean())
            if hidden:
                assert t.hidden is not None
                per_layer = [
                    (h[0] - t.hidden[:, j]).pow(2).sum(-1) / t.hidden[:, j].pow(2).sum(-1)
                    for j, h in enumerate(out.hidden_states[1:])
                ]
                hidden_terms.append(torch.stack(per_layer).mean())
        unload(model)
    want = torch.cat(answer_kl).mean() + every_position * torch.stack(position_terms).mean()
    want_each = torch.stack([kl.mean() for kl in answer_kl])
    want_each = want_each + every_position * torch.stack(position_terms)
    if hidden:
        want = want + hidden * torch.stack(hidden_terms).mean()
        want_each = want_each + hidden * torch.stack(hidden_terms)
    assert float(want) > 1e-3  # the members differ: a loss that cannot be zero here
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert torch.allclose(each, want_each, rtol=1e-4, atol=1e-6)  # what tune's sampler reads


def test_tune_loss_is_zero_when_the_composition_is_the_teacher(tiny_lm_dir) -> None:
    from sbora_reg.sbora import unload
    from sbora_reg.sbora.calibrate import _Teacher, _tune_loss
    from sbora_reg.sbora.model import apply_adapter
    from sbora_reg.sbora.training import encode

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    member = _random_members(model, 0.3)[0]
    rows = [("1+1=", "2"), ("12*3 is", "36 exactly")]
    cpu = torch.device("cpu")
    with torch.no_grad():
        apply_adapter(model, member)
        teachers = [_Teacher.read(model, encode(tokenizer, [r], cpu), True) for r in rows]
        got, each = _tune_loss(model, encode(tokenizer, rows, cpu), teachers, 1.0, 1.0)
        unload(model)
    assert (
        abs(float(got)) < 1e-5 and float(each.abs().max()) < 1e-5
    )  # rounding of padded vs unpadded attention only


def test_tune_lowers_the_distillation_gap_on_the_regions_and_restores_the_model(
    tiny_lm_dir,
) -> None:
    """tune: its objective (KL to member alone on the answer tokens and every position, hidden
    states) goes down; indices, scales and the base model stay as they were."""
    from sbora_reg.sbora import sbora_layers, unload
    from sbora_reg.sbora.calibrate import (
        TUNE_EVERY_POSITION,
        TUNE_HIDDEN,
        _Teacher,
        _tune_loss,
        tune,
    )
    from sbora_reg.sbora.model import apply_adapter
    from sbora_reg.sbora.training import encode

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    members = _random_members(model, 0.3)
    sets = [
        [(f"{i}+{i}=", str(2 * i)) for i in range(6)],
        [(f"{i}*3=", str(3 * i)) for i in range(6)],
    ]

    def gap(adapters: list[Adapter]) -> float:  # tune's whole objective, per task
        total = 0.0
        cpu = torch.device("cpu")
        for i, rows in enumerate(sets):
            with torch.no_grad():
                apply_adapter(model, members[i])
                teachers = [_Teacher.read(model, encode(tokenizer, [r], cpu), True) for r in rows]
                unload(model)
                apply_adapter(model, _stacked(adapters))
                total += float(_tune_loss(model, encode(tokenizer, rows, cpu), teachers,
                                          TUNE_EVERY_POSITION, TUNE_HIDDEN)[0])  # fmt: skip
                unload(model)
        return total

    tuned = tune(model, tokenizer, members, sets, steps=40, lr=1e-2, batch_size=4)
    assert gap(tuned) < 0.7 * gap(members)
    balanced = tune(model, tokenizer, members, sets, steps=40, lr=1e-2, batch_size=4, balance=1.0)
    assert gap(balanced) < 0.7 * gap(members)
    for a, t in zip(members, tuned, strict=True):
        for name, module in a.modules.items():
            assert torch.equal(module.indices, t.modules[name].indices)
            assert module.scale == t.modules[name].scale
    assert not list(sbora_layers(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_match_returns_one_member_unchanged_and_reproduces_each_member_alone_better(
    tiny_lm_dir,
) -> None:
    """match: with one member, nothing changes (its target is its own output); with two, the
    composed model's outputs on each task move toward that member alone's (final logits)."""
    from sbora_reg.sbora import sbora_layers, unload
    from sbora_reg.sbora.calibrate import match
    from sbora_reg.sbora.model import apply_adapter
    from sbora_reg.sbora.training import encode

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    members = _random_members(model, 0.5)
    sets = [
        [(f"{i}+{i}=", str(2 * i)) for i in range(8)],
        [(f"{i}*3=", str(3 * i)) for i in range(8)],
    ]
    (alone,) = match(model, tokenizer, members[:1], sets[:1])
    for name, module in alone.modules.items():
        b0 = members[0].modules[name].b
        assert torch.allclose(module.b, b0, rtol=1e-4, atol=1e-5 * float(b0.abs().max()))

    def logits(adapters) -> list[torch.Tensor]:
        out = []
        with torch.no_grad():
            for rows in sets:
                enc = encode(tokenizer, rows, torch.device("cpu"))
                model_ = apply_adapter(model, _stacked(adapters))
                out.append(model_(input_ids=enc["input_ids"],
                                  attention_mask=enc["attention_mask"]).logits)  # fmt: skip
                unload(model)
        return out

    want = [logits([m])[i] for i, m in enumerate(members)]
    plain = logits(members)
    matched = logits(match(model, tokenizer, members, sets))
    for i in range(2):
        assert (matched[i] - want[i]).norm() < (plain[i] - want[i]).norm()
    assert not list(sbora_layers(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tune_sampler_is_the_plain_shuffle_without_balance_and_follows_the_loss_with_it() -> None:
    """balance 0: the training loop's seeded shuffle of every row; balance 1: a member whose
    running loss is 9× another's gets ~9× its slots, and every slot names an example of the
    member it was drawn for (each member's examples in its own shuffle, none repeated early)."""
    from sbora_reg.sbora.calibrate import _Sampler
    from sbora_reg.sbora.training import global_batches

    plain = _Sampler([5, 7], 4, 6, 3, 0.0)
    assert [plain.next() for _ in range(6)] == global_batches(12, 4, seed=3, steps=6, epochs=1)

    sampler = _Sampler([40, 40], 16, 0, 0, 1.0)
    first = sampler.next()  # nothing seen yet: the members alike
    assert len(first) == 16 and len(set(first)) == 16
    sampler.observe(
        [0 if k < 40 else 1 for k in first], torch.tensor([9.0 if k < 40 else 1.0 for k in first])
    )
    assert torch.allclose(sampler.weights(), torch.tensor([0.9, 0.1], dtype=torch.float64))
    slots = [k for _ in range(100) for k in sampler.next()]
    share = sum(k < 40 for k in slots) / len(slots)
    assert 0.85 < share < 0.95  # binomial(1600, 0.9): sd 0.0075
    member0 = [k for k in first + slots if k < 40]
    assert sorted(member0[:40]) == list(range(40))  # one whole epoch of member 0, then the next
    assert sorted(member0[40:80]) == list(range(40))
