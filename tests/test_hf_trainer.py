"""Adam-mini in the Hugging Face Trainer and in accelerate (single process, CPU), on a tiny Llama from
its config: the helpers' hyperparameters and param groups, exact resumption from a checkpoint, the
traps of bare tensors and of torch.compile's parameter names."""

from __future__ import annotations

import pytest
import torch

import optim
from hessian_blocks import Partition, build_model
from optim import AdamMini, default_partition
from optim.hf import adam_mini_from_training_args, trainer_optimizer_cls_and_kwargs

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

LLAMA = dict(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, context=8)
STEPS, INTERRUPT = 6, 3


def tiny_llama(seed: int = 0):
    return build_model("hf:LlamaForCausalLM", seed=seed, **LLAMA).model


def token_dataset(n: int = 24) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, LLAMA["vocab_size"], (n, LLAMA["context"]), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def training_args(folder, **changes):
    options = dict(output_dir=str(folder), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-3,
                   weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, logging_steps=1,
                   save_steps=INTERRUPT, save_strategy="steps", report_to="none", use_cpu=True, seed=0,
                   disable_tqdm=True)
    return transformers.TrainingArguments(**{**options, **changes})


class StopAt(transformers.TrainerCallback):
    """Stops training (as an interruption would) right after the checkpoint of step ``step`` is saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def rules_of(partition: Partition) -> dict[str, dict]:
    return {rule["param"]: rule for rule in partition.to_dict()["rules"]}


def step_losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_helper_takes_hyperparameters_and_no_decay_groups_from_training_args(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path)
    optimizer = adam_mini_from_training_args(model, args)
    decay, no_decay = optimizer.param_groups
    assert (decay["lr"], decay["betas"], decay["eps"]) == (3e-3, (0.8, 0.95), 1e-7)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # RMSNorm scales (found by module type) get no weight decay, every matrix does
    assert all(name.endswith("norm.weight") for name in no_decay["param_names"])
    assert len(decay["param_names"]) == sum(p.ndim == 2 for p in model.parameters())
    assert rules_of(optimizer.partition) == rules_of(default_partition(model))

    # the Trainer builds the same optimizer from optimizer_cls_and_kwargs
    trainer = transformers.Trainer(model, args, train_dataset=token_dataset(),
                                   optimizer_cls_and_kwargs=trainer_optimizer_cls_and_kwargs(model, args))
    built = trainer.create_optimizer()
    assert isinstance(built, AdamMini)
    assert [g["weight_decay"] for g in built.param_groups] == [0.1, 0.0]
    assert [g["param_names"] for g in built.param_groups] == [decay["param_names"], no_decay["param_names"]]


def test_trainer_passing_bare_tensors_gets_an_error_naming_the_helpers(tmp_path):
    model = tiny_llama()
    trainer = transformers.Trainer(model, training_args(tmp_path), train_dataset=token_dataset(),
                                   optimizer_cls_and_kwargs=(AdamMini, {"lr": 1e-3}))
    with pytest.raises(TypeError, match=r"got Parameter: .*optim\.hf\.adam_mini_from_training_args\(model, args\)"):
        trainer.create_optimizer()
    with pytest.raises(TypeError, match="bare tensors together with model="):
        AdamMini(model.parameters())
    named = AdamMini(list(model.parameters()), model=model)  # bare tensors with their model: named
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_trainer_resumed_from_a_checkpoint_gives_the_uninterrupted_losses(tmp_path):
    data = token_dataset()

    def trainer(folder, callbacks=()):
        model = tiny_llama()
        args = training_args(folder)
        return transformers.Trainer(model, args, train_dataset=data, callbacks=list(callbacks),
                                    optimizers=(adam_mini_from_training_args(model, args), None))

    uninterrupted = trainer(tmp_path / "full")
    uninterrupted.train()
    expected = step_losses(uninterrupted)
    assert sorted(expected) == list(range(1, STEPS + 1)) and expected[STEPS] < expected[1]

    interrupted = trainer(tmp_path / "parts", callbacks=[StopAt(INTERRUPT)])
    interrupted.train()
    assert interrupted.state.global_step == INTERRUPT
    resumed = trainer(tmp_path / "parts")
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / f"checkpoint-{INTERRUPT}"))
    losses = {**step_losses(interrupted), **step_losses(resumed)}
    assert losses == pytest.approx(expected, rel=1e-6, abs=0)
    final = dict(uninterrupted.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, final[name], rtol=1e-6, atol=1e-7)


def test_accelerate_prepared_adam_mini_steps_and_resumes_like_plain_training(tmp_path):
    batches = [{k: torch.stack([row[k] for row in chunk]) for k in ("input_ids", "attention_mask", "labels")}
               for chunk in (token_dataset()[i:i + 4] for i in range(0, 24, 4))]

    def run(model, optimizer, steps, accelerator=None):
        model.train()
        for batch in steps:
            optimizer.zero_grad()
            loss = model(**batch).loss
            (accelerator.backward(loss) if accelerator else loss.backward())
            optimizer.step()

    plain = tiny_llama()
    run(plain, AdamMini(plain, lr=3e-3, weight_decay=0.1), batches)

    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_llama()
    model, optimizer = accelerator.prepare(model, AdamMini(model, lr=3e-3, weight_decay=0.1))
    run(model, optimizer, batches[:INTERRUPT], accelerator)
    accelerator.save_state(str(tmp_path / "state"))
    # as a new process would: build everything again and load the saved state
    accelerator = accelerate.Accelerator(cpu=True)
    again = tiny_llama(seed=1)  # other initial weights: all of them come from the checkpoint
    again, optimizer = accelerator.prepare(again, AdamMini(again, lr=3e-3, weight_decay=0.1))
    accelerator.load_state(str(tmp_path / "state"))
    run(again, optimizer, batches[INTERRUPT:], accelerator)
    expected = dict(plain.named_parameters())
    for name, param in accelerator.unwrap_model(again).named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-6, atol=1e-7)


def test_compiled_model_uses_the_original_names_for_partitions_and_checkpoints(tmp_path):
    eager = tiny_llama()
    compiled = torch.compile(eager)  # not run: only its parameter names matter here
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    path = tmp_path / "partition.json"
    default_partition(eager).save(path)
    optimizer = AdamMini(compiled, partition=path, lr=1e-3)  # a partition file of the eager model fits
    assert optimizer.param_groups[0]["param_names"] == [n for n, _ in eager.named_parameters()]
    for p in eager.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    restored = AdamMini(eager, partition=Partition.load(path, eager), lr=1e-3)
    restored.load_state_dict(optimizer.state_dict())  # a compiled run's checkpoint loads into an eager one
    assert torch.equal(restored.state[eager.lm_head.weight]["exp_avg"],
                       optimizer.state[eager.lm_head.weight]["exp_avg"])
    assert rules_of(AdamMini(compiled).partition) == rules_of(default_partition(eager))
    eager_names = [g["param_names"] for g in optim.make("adam_mini", eager, lr=1e-3, weight_decay=0.1).param_groups]
    assert [g["param_names"]
            for g in optim.make("adam_mini", compiled, lr=1e-3, weight_decay=0.1).param_groups] == eager_names
    args = training_args(tmp_path)
    assert [g["param_names"] for g in adam_mini_from_training_args(compiled, args).param_groups] == eager_names
    with pytest.raises(ValueError, match="torch.compile wrapper's name: .*pass the compiled module itself"):
        AdamMini(compiled.named_parameters(), partition=path)
