"""Training workflows around the diagonal training program (issue 16): activation checkpointing per
step, dropout in ``train()`` mode, LoRA adapters (peft) and the Hugging Face ``Trainer``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import diagpass
from diagpass import models
from diagpass.models.armt import ARMT
from tests.helpers import logits_of, max_rel_err

EAGER = {"compiler": "eager"}


def _ids(batch: int, length: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _loss(out: Any) -> torch.Tensor:
    return logits_of(out).float().square().mean()


def _grads(model: torch.nn.Module, call: Callable[[], Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients of every trainable parameter, and the bytes autograd saved for backward."""
    model.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(call())
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved[0]


def _drop_history(model: torch.nn.Module) -> None:
    """The state a run left has autograd history: drop it so the model can be deep-copied."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(module, name, value.detach())


def eager_reference(
    model: torch.nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float], int]:
    """The model's own (sequential eager) loss and gradients, how far each gradient is from fp64
    (a random ARMT amplifies rounding), and the bytes eager saved for backward."""
    loss, grads, saved = _grads(model, lambda: model(ids))
    _drop_history(model)
    model64 = copy.deepcopy(model).double()
    _, grads64, _ = _grads(model64, lambda: model64(ids))
    return loss, grads, {k: max_rel_err(g, grads64[k].float()) for k, g in grads.items()}, saved


def assert_matches_eager(
    model: torch.nn.Module,
    ids: torch.Tensor,
    run: Callable[[torch.Tensor], Any],
    reference: tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float], int] | None = None,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """``run(ids)``'s loss and gradients against the model's own within 1e-5 relative, or three
    times eager fp32's own distance from fp64 (as tests/test_training.py). Returns the gradients,
    and the bytes saved for backward by ``run`` and by eager."""
    loss, grads, saved = _grads(model, lambda: run(ids))
    want_loss, want, noise, eager_saved = reference or eager_reference(model, ids)
    assert grads.keys() == want.keys() and grads
    for name in want:
        assert max_rel_err(grads[name], want[name]) <= max(1e-5, 3 * noise[name]), name
    assert max_rel_err(loss, want_loss) <= 1e-5
    return grads, saved, eager_saved


# --- activation checkpointing per step -----------------------------------------------------------


def test_checkpoint_steps_option_is_validated() -> None:
    assert diagpass.parse_options({"checkpoint_steps": True}).checkpoint_steps
    assert not diagpass.parse_options().checkpoint_steps
    with pytest.raises(diagpass.ConfigError, match="checkpoint_steps"):
        diagpass.parse_options({"checkpoint_steps": 1})


def test_checkpointed_steps_match_eager_in_train_mode_without_dropout() -> None:
    """``diagpass.compile(..., options={"checkpoint_steps": True})`` on a model in ``train()`` mode
    whose dropout is 0: every step runs checkpointed, saves far less than eager for backward, and
    the loss and every gradient equal the sequential model's."""
    config = models.tiny_llama_config(attention_dropout=0.0)
    model = models.build_armt(config=config, segment_size=8, num_mem_tokens=4, d_mem=8).train()
    fast = diagpass.compile(model, _ids(2, 24), options={**EAGER, "checkpoint_steps": True})
    _, saved, eager_saved = assert_matches_eager(model, _ids(2, 61, seed=1), fast)
    run = fast.report.runs[0]
    assert run.path == "diagonal" and run.autograd and run.stats is not None, run
    assert counters["diagpass"]["checkpointed_steps"] == run.stats.batched_calls > 0
    assert saved < 0.7 * eager_saved, (saved, eager_saved)
    with torch.no_grad():  # inference is never checkpointed
        fast(_ids(2, 61, seed=2))
    assert counters["diagpass"]["checkpointed_steps"] == run.stats.batched_calls


def _dropout_armt(p: float, seed: int = 0) -> ARMT:
    config = models.tiny_llama_config(attention_dropout=p)
    return models.build_armt(config=config, segment_size=8, num_mem_tokens=2, d_mem=8, seed=seed).train()


def test_backend_checkpointed_steps_equal_the_plain_training_program_with_dropout() -> None:
    """``torch.compile(backend="diagbatch", options={"checkpoint_steps": True})``: with dropout on
    and the same seed, checkpointing changes nothing (the recomputation draws the same masks:
    the random state is restored), and it saves less for backward."""
    model = _dropout_armt(0.3)
    ids = _ids(2, 32, seed=3)
    results = []
    for checkpointed in (False, True):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(
            model, backend="diagbatch", dynamic=False, options={**EAGER, "checkpoint_steps": checkpointed}
        )
        torch.manual_seed(7)
        results.append(_grads(model, lambda: compiled(ids)))
        record = diagpass.last_compile()
        assert record is not None and record.applied and record.training, record
        assert record.path == "diagonal program" and record.num_steps == 4 + 2 - 1
        assert (counters["diagpass"]["checkpointed_steps"] > 0) == checkpointed
    (loss, grads, saved), (ck_loss, ck_grads, ck_saved) = results
    assert torch.equal(loss, ck_loss)
    assert grads.keys() == ck_grads.keys() and all(torch.equal(grads[k], ck_grads[k]) for k in grads)
    assert ck_saved < 0.7 * saved, (ck_saved, saved)
    torch.manual_seed(8)
    assert not torch.equal(_loss(compiled(ids)), ck_loss)  # dropout is on: another seed, another loss


# --- dropout: the same distribution, not the same draws ------------------------------------------


def test_steps_that_draw_random_numbers_train_with_eager_steps() -> None:
    """With the default (Inductor) step compiler, Inductor's training steps gave NaN outputs with
    attention dropout (torch 2.13, CPU), so steps that draw random numbers run as eager batched
    steps; the loss and gradients are finite."""
    model = _dropout_armt(0.3)
    compiled = torch.compile(model, backend="diagbatch", dynamic=False)
    loss, grads, _ = _grads(model, lambda: compiled(_ids(2, 32, seed=3)))
    record = diagpass.last_compile()
    assert record is not None and record.applied and record.training and record.config.compiler == "eager", record
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_vmapped_steps_draw_a_dropout_mask_per_cell() -> None:
    """The batched step is ``vmap(..., randomness="different")``: each cell (lane) draws its own
    mask, as the sequential model's cells do, at the model's rate."""
    from diagpass.lower import batched_template

    template = torch.fx.symbolic_trace(lambda x: (F.dropout(x, 0.5, True),))
    (out,) = batched_template(template, [0])(torch.ones(4, 4000))
    zeros = (out == 0).float().mean(dim=1)
    assert torch.all((zeros - 0.5).abs() < 0.04), zeros
    assert not any(torch.equal(out[i], out[j]) for i in range(4) for j in range(i))
    assert torch.all((out == 0) | (out == 2))


@pytest.mark.slow  # 80 sampled runs and two compiles: ~25 s on an idle core, minutes on a busy one
def test_dropout_trains_on_the_diagonal_with_the_models_distribution() -> None:
    """With dropout on, the training program runs on the diagonal (not a fallback) and its outputs
    have the sequential model's distribution: over independent seeds, the per-element mean and the
    spread of the logits agree (a two-sample test that a program without dropout, or with another
    rate, fails on the spread), and every sample differs from eval mode. Inference in ``train()`` mode runs the model itself, and
    after ``eval()`` the program traced in eval mode runs, equal to the eval model."""
    model = _dropout_armt(0.5)
    ids = _ids(1, 24, seed=4)
    fast = diagpass.compile(model, ids, options=EAGER)
    assert fast.random is not None and "draws random numbers" in fast.random

    def samples(call: Callable[[torch.Tensor], Any], first_seed: int, n: int = 40) -> torch.Tensor:
        outs = []
        for k in range(n):
            torch.manual_seed(first_seed + k)
            outs.append(logits_of(call(ids)).detach())
        return torch.stack(outs)  # [n, B, N, V]

    diagonal = samples(fast, 1000)
    assert all(run.path == "diagonal" and run.autograd for run in fast.report.runs), fast.report.runs[-1]
    sequential = samples(model, 2000)
    with torch.no_grad():
        model.eval()
        evaluated = logits_of(model(ids))
        model.train()
    n = diagonal.shape[0]
    spread = ((diagonal.var(0) + sequential.var(0)) / n).sqrt()
    z = ((diagonal.mean(0) - sequential.mean(0)) / spread).abs().mean().item()  # ~0.8 for equal means
    variance = (diagonal.var(0).mean() / sequential.var(0).mean()).item()
    print(f"dropout samples: mean |z| {z:.3f} (0.8 expected), variance ratio {variance:.3f}")
    assert z < 1.1 and 0.8 < variance < 1.25, (z, variance)
    assert all(max_rel_err(sample, evaluated) > 1e-3 for sample in diagonal)  # dropout really is on
    with torch.no_grad():  # inference in train() mode: the model itself
        fast(ids)
    assert fast.report.runs[-1].path == "eager" and "train() mode" in (fast.report.runs[-1].reason or "")
    model.eval()  # another mode: the probe is traced again in it, once
    out = fast(ids)
    assert fast.report.runs[-1].path == "diagonal" and "train()/eval()" in (fast.report.runs[-1].reason or "")
    assert max_rel_err(logits_of(out).detach(), evaluated) < 1e-5


# --- LoRA (peft) ---------------------------------------------------------------------------------


def _lora_armt() -> ARMT:
    """The zoo's tiny ARMT around a Llama base that carries LoRA adapters on q and v (peft freezes
    the base; LoRA and ARMT's memory parameters train)."""
    peft = pytest.importorskip("peft")
    base = models.build_base("llama")
    adapter = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = ARMT(peft.get_peft_model(base, adapter), segment_size=8, num_mem_tokens=2, d_mem=8).eval()
    with torch.no_grad():  # as models.build_armt: a non-zero W_mv, so the memory matters
        for layer in model.layers:
            layer.W_mv.weight.normal_(0.0, 0.02)
    return model


def test_lora_gradients_match_eager_through_diagpass_compile() -> None:
    model = _lora_armt()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "W_m" in n or n == "memory" for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("W_mq" in n for n in trainable)
    fast = diagpass.compile(model, _ids(2, 24), options=EAGER)
    grads, _, _ = assert_matches_eager(model, _ids(2, 44, seed=5), fast)
    assert grads.keys() == trainable
    run = fast.report.runs[0]
    assert run.path == "diagonal" and run.autograd, run


@pytest.mark.slow  # a second trace of the LoRA model (~1600 nodes)
def test_lora_gradients_match_eager_through_the_backend() -> None:
    model = _lora_armt()
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=EAGER)
    grads, _, _ = assert_matches_eager(model, _ids(2, 44, seed=5), compiled)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    record = diagpass.last_compile()
    assert record is not None and record.applied and record.training and record.path == "diagonal program", record
    assert record.num_steps == 6 + 2 - 1


# --- Hugging Face Trainer ------------------------------------------------------------------------


class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, length: int) -> None:
        self.ids = _ids(n, length, seed=6)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(model: torch.nn.Module, out_dir: str) -> list[float]:
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=0.5,
        optim="sgd",  # the update is the gradient: parameters compare as tightly as gradients
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,  # the compiled module's forward takes **kwargs
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(6, 40))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_hf_trainer_trains_the_compiled_model_like_the_eager_one(tmp_path: Any) -> None:
    """A few ``transformers.Trainer`` steps on ``torch.compile(model, backend="diagbatch")`` (the
    model returns its loss given labels): the steps run the diagonal training program, the loss is
    finite, the parameters move, and they end where the same Trainer run on the eager model ends."""
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8).train()
    eager = copy.deepcopy(model)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    compiled = torch.compile(model, backend="diagbatch", dynamic=False, options=EAGER)
    losses = _train(compiled, str(tmp_path / "diagonal"))
    record = diagpass.last_compile()
    assert record is not None and record.applied and record.training and record.path == "diagonal program", record
    assert not counters["diagpass"]["fallbacks"]
    assert counters["diagpass"]["batched_steps"] >= 3 * (5 + 2 - 1)
    eager_losses = _train(eager, str(tmp_path / "eager"))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    moved = 0
    for name, param in model.named_parameters():
        want = dict(eager.named_parameters())[name]
        moved += not torch.equal(param, before[name])
        assert max_rel_err(param.detach(), want.detach()) <= 1e-5, name
    assert moved > 0.9 * len(before)


def test_hf_trainer_trains_the_diagpass_compile_module_like_the_eager_one(tmp_path: Any) -> None:
    """The module ``diagpass.compile`` returns goes to ``Trainer`` as is: its ``config`` is the
    model's (the diagbatch options are ``diagbatch_config``), the batches' length is another than
    the probe's, and the parameters end where the eager Trainer run ends."""
    model = models.build_armt(segment_size=8, num_mem_tokens=2, d_mem=8).train()
    eager = copy.deepcopy(model)
    # Probed the way Trainer calls: keywords, and the token count of the batch (a tensor).
    probe = _ids(2, 24)
    fast = diagpass.compile(model, input_ids=probe, labels=probe, num_items_in_batch=torch.tensor(48.0), options=EAGER)
    assert fast.config is model.config and fast.diagbatch_config.compiler == "eager"
    losses = _train(fast, str(tmp_path / "diagonal"))
    runs = fast.report.runs
    assert runs and all(run.path == "diagonal" and run.autograd for run in runs), runs[-1]
    eager_losses = _train(eager, str(tmp_path / "eager"))
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for name, param in model.named_parameters():
        assert max_rel_err(param.detach(), dict(eager.named_parameters())[name].detach()) <= 1e-5, name
