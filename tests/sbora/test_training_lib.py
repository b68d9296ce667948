"""training.train_adapter: data checks, exactness of what changes, loss, determinism, indices."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sbora_reg import sbora
from sbora_reg.errors import ConfigError, DataError, FingerprintMismatchError, SboraRegError
from sbora_reg.sbora import SBoRAConfig, training
from sbora_reg.sbora.training import Example

TARGETS = ("q_proj", "v_proj", "down_proj")


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def addition_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)})
    return rows


def answer_loss(model: torch.nn.Module, tokenizer, examples: list[Example]) -> float:
    batch = training.encode(tokenizer, examples, torch.device("cpu"))
    with torch.no_grad():
        nll, count = training._token_nll(model, batch)
    return float(nll) / count


# ---- data -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no examples"),
        ("\n  \n", "holds no examples"),
        ('{"prompt": "a", "answer": "b"}\n{oops\n', "line 2 is not valid JSON"),
        ('{"prompt": "a"}\n', "line 1 needs string 'prompt' and non-empty 'answer'"),
        ('{"answer": 3, "prompt": "x"}\n', "line 1 needs string"),
        ("[1, 2]\n", "line 1 must be a JSON object"),
        ('{"text": ""}\n', "line 1: 'text' must be a non-empty string"),
    ],
)
def test_bad_data_names_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        training.load_examples(path)
    assert isinstance(info.value, SboraRegError) and "\n" not in str(info.value)


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        training.load_examples(tmp_path / "nope.jsonl")


def test_prompt_answer_and_text_rows(tmp_path: Path, tiny_lm_dir: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "answer": "3"}, {"text": "hi"}])
    examples = training.load_examples(path)
    assert examples == [Example("1+2=", "3"), Example("", "hi")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    batch = training.encode(tokenizer, examples, torch.device("cpu"))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    eos = tokenizer.eos_token_id
    prompt_len = len(tokenizer("1+2=", add_special_tokens=False).input_ids)
    # prompt/answer: loss on the answer and EOS only
    assert (labels[0, :prompt_len] == -100).all()
    assert labels[0, prompt_len:].tolist() == ids[0, prompt_len:].tolist()
    assert ids[0, -1] == eos
    # text: loss on every real token; padding is masked out of attention and loss
    real = mask[1].bool()
    assert labels[1, real].tolist() == ids[1, real].tolist()
    assert (labels[1, ~real] == -100).all() and int(real.sum()) == 3


def test_global_batches_cover_each_epoch_and_repeat_for_steps() -> None:
    plan = training.global_batches(10, 4, seed=1, steps=None, epochs=2)
    assert [len(b) for b in plan] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(plan[:3], [])) == list(range(10)) == sorted(sum(plan[3:], []))
    assert plan[:3] != plan[3:]  # reshuffled per epoch
    assert training.global_batches(10, 4, seed=1, steps=5, epochs=1) == plan[:5]


# ---- training -------------------------------------------------------------------------------
def _train(base: Path, data: Path, out: Path, variant: str = "fa", **kw) -> training.TrainResult:
    config = SBoRAConfig(variant=variant, r=8, alpha=16, target_modules=TARGETS)
    return training.train_adapter(
        base, data, out, config=config, steps=kw.pop("steps", 25), batch_size=8, lr=2e-2, **kw
    )


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_training_changes_only_the_region_and_lowers_loss(
    tmp_path: Path, tiny_lm_dir: Path, variant: str
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(64))
    steps: list[int] = []
    result = _train(
        tiny_lm_dir, data, tmp_path / "ad", variant, on_step=lambda s, n, _l: steps.append(s)
    )
    assert steps == list(range(25)) and len(result.losses) == 25
    adapter = sbora.Adapter.load(result.adapter_dir)
    assert adapter.num_parameters() == result.trainable_parameters > 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    held_out = [Example(r["prompt"], r["answer"]) for r in addition_rows(64, seed=7)]
    before = answer_loss(base, tokenizer, held_out)
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = sbora.merge_and_unload(adapter.apply(base))
    assert answer_loss(tuned, tokenizer, held_out) < before - 0.3
    changed = 0
    for name, w in tuned.state_dict().items():
        module = name.removesuffix(".weight")
        if module not in adapter.modules:
            assert torch.equal(w, w0[name]), name  # untouched: bit-identical
            continue
        m = adapter.modules[module]
        factor = m.b if variant == "fa" else m.a
        eye = torch.eye(m.shape[1] if variant == "fa" else m.shape[0], dtype=torch.float64)
        one_hot = eye[m.indices]  # (r, in) for FA, (r, out) for FB
        ref = factor.double() @ one_hot if variant == "fa" else one_hot.T @ factor.double()
        torch.testing.assert_close(w.double(), w0[name].double() + m.scale * ref)
        outside = torch.ones_like(w, dtype=torch.bool)
        if variant == "fa":
            outside[:, m.indices] = False
        else:
            outside[m.indices, :] = False
        assert torch.equal(w[outside], w0[name][outside])
        changed += int((w != w0[name]).sum())
    assert changed > 0


def test_same_seed_same_adapter(tmp_path: Path, tiny_lm_dir: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(20))
    a = _train(tiny_lm_dir, data, tmp_path / "a", steps=4, seed=3)
    b = _train(tiny_lm_dir, data, tmp_path / "b", steps=4, seed=3)
    c = _train(tiny_lm_dir, data, tmp_path / "c", steps=4, seed=4)
    assert a.losses == b.losses
    assert a.adapter.sha256() == b.adapter.sha256() != c.adapter.sha256()


def test_text_rows_bf16_and_gradient_checkpointing(tmp_path: Path, tiny_lm_dir: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"{i} {i + 1} {i + 2}"} for i in range(20)])
    result = _train(
        tiny_lm_dir,
        data,
        tmp_path / "ad",
        steps=3,
        dtype=torch.bfloat16,
        gradient_checkpointing=True,
    )
    assert all(
        m.b is not None and m.b.dtype == torch.bfloat16 for m in result.adapter.modules.values()
    )
    assert len(result.losses) == 3 and sbora.Adapter.load(tmp_path / "ad").modules


def test_checkpointing_gives_the_same_adapter(tmp_path: Path, tiny_lm_dir: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(16))
    plain = _train(tiny_lm_dir, data, tmp_path / "a", steps=3)
    ckpt = _train(tiny_lm_dir, data, tmp_path / "b", steps=3, gradient_checkpointing=True)
    for name, m in plain.adapter.modules.items():
        torch.testing.assert_close(ckpt.adapter.modules[name].b, m.b)


def test_indices_file_is_used_and_checked(tmp_path: Path, tiny_lm_dir: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(8))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    config = SBoRAConfig(variant="fa", r=4, alpha=8, target_modules=("q_proj",))
    names = [n for n, _ in model.named_modules() if n.endswith("q_proj")]
    chosen = {n: torch.tensor([1, 5, 9, 60 - i]) for i, n in enumerate(names)}
    good = sbora.save_indices(
        tmp_path / "i.safetensors", chosen, "fa", sbora.model_fingerprint(model)
    )
    result = training.train_adapter(
        tiny_lm_dir, data, tmp_path / "ad", config=config, indices=good, steps=2
    )
    saved = sbora.Adapter.load(result.adapter_dir).indices
    assert {k: v.tolist() for k, v in saved.items()} == {
        k: sorted(v.tolist()) for k, v in chosen.items()
    }
    other = sbora.save_indices(tmp_path / "o.safetensors", chosen, "fa", "0" * 64)
    with pytest.raises(FingerprintMismatchError, match="another base model"):
        training.train_adapter(
            tiny_lm_dir, data, tmp_path / "x", config=config, indices=other, steps=2
        )
    fb = SBoRAConfig(variant="fb", r=4, alpha=8, target_modules=("q_proj",))
    with pytest.raises(ConfigError, match="'fa' indices"):
        training.train_adapter(tiny_lm_dir, data, tmp_path / "x", config=fb, indices=good, steps=2)
    assert not (tmp_path / "x").exists()
    filled = training.config_for_indices(good)
    assert (filled.variant, filled.r, filled.alpha) == ("fa", 4, 8.0)
    assert sorted(filled.target_modules) == sorted(names)
    with pytest.raises(ConfigError, match="--rank is 5"):
        training.config_for_indices(good, r=5)


def test_threads_are_set_for_training_and_restored(
    tmp_path: Path, tiny_lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = training.run_steps

    def spy(*args: object, **kwargs: object) -> list[float]:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "run_steps", spy)
    before = torch.get_num_threads()
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(8))
    _train(tiny_lm_dir, data, tmp_path / "a", steps=1, threads=1)
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="at least 1"):
        _train(tiny_lm_dir, data, tmp_path / "b", steps=1, threads=0)
    assert not (tmp_path / "b").exists()


def test_auto_threads_leave_the_busy_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(training.os.sched_getaffinity(0))
    assert training._runnable_others() is not None  # Linux: /proc/loadavg parses
    readings = iter([3, 1, 2, 5, 1])  # runnable others, sampled: the least counts
    monkeypatch.setattr(training, "_runnable_others", lambda: next(readings))
    assert training.auto_threads(interval=0) == max(1, cores - 1)
    monkeypatch.setattr(training, "_runnable_others", lambda: 0)
    assert training.auto_threads(interval=0) == cores
    monkeypatch.setattr(training, "_runnable_others", lambda: 10 * cores)
    assert training.auto_threads(interval=0) == 1
    monkeypatch.setattr(training, "_runnable_others", lambda: None)  # no /proc: every core
    assert training.auto_threads(interval=0) == cores


def test_auto_threads_follow_the_load(
    tmp_path: Path, tiny_lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under threads="auto" the load is read at the start and every THREADS_RECHECK_STEPS."""
    readings = iter([2, 1])  # idle at the start, another job has started by step 10
    monkeypatch.setattr(training, "auto_threads", lambda *_a, **_k: next(readings))
    seen: list[int] = []
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(8))
    before = torch.get_num_threads()
    steps = training.THREADS_RECHECK_STEPS
    _train(
        tiny_lm_dir, data, tmp_path / "a", steps=steps, threads="auto",
        on_step=lambda *_: seen.append(torch.get_num_threads()),
    )  # fmt: skip
    assert seen == [2] * (steps - 1) + [1]
    assert torch.get_num_threads() == before
