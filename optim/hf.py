"""Adam-mini in the Hugging Face Trainer, set up from its ``TrainingArguments``.

    from optim.hf import adam_mini_from_training_args, trainer_optimizer_cls_and_kwargs

    trainer = Trainer(model, args, train_dataset=data,
                      optimizers=(adam_mini_from_training_args(model, args), None))   # the Trainer makes the scheduler
    # or, letting the Trainer build the optimizer itself:
    trainer = Trainer(model, args, train_dataset=data,
                      optimizer_cls_and_kwargs=trainer_optimizer_cls_and_kwargs(model, args))

Both take the learning rate, betas, epsilon and weight decay from ``args`` and leave norm and bias
parameters without weight decay (:func:`~optim.param_groups.param_groups_no_decay`), as the Trainer
does for AdamW. Writing ``optimizer_cls_and_kwargs=(AdamMini, {"model": model, ...})`` by hand does
not: the Trainer takes a ``"model"`` key as the parameters themselves, so the optimizer gets one
group and no weight decay from ``args``; without it the Trainer passes bare tensors, which AdamMini
cannot tie to partition rules (a TypeError naming these helpers). Checkpoints resume exactly
(``trainer.train(resume_from_checkpoint=...)``): AdamMini's state dict is a torch one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from hessian_blocks.blocks import Partition
from hessian_blocks.partitions.structural import default_partition

from .adam_mini import AdamMini, _uncompiled
from .param_groups import param_groups_no_decay

__all__ = ["adam_mini_from_training_args", "trainer_optimizer_cls_and_kwargs"]


def trainer_optimizer_cls_and_kwargs(
    model: nn.Module, args: Any, *, partition: Partition | str | Path = "default", **kwargs: Any
) -> tuple[type[AdamMini], dict[str, Any]]:
    """``(AdamMini, kwargs)`` for the Trainer's ``optimizer_cls_and_kwargs``: named param groups with
    ``args.weight_decay`` (none on norms and biases) under the key "params" (which the Trainer uses
    as the parameters), the partition resolved for ``model`` ("default": the structural default),
    ``lr=args.learning_rate``, ``betas=(args.adam_beta1, args.adam_beta2)``, ``eps=args.adam_epsilon``.
    Further keyword arguments go to AdamMini (``n_heads``, ``foreach``, ...) and win over ``args``."""
    model = _uncompiled(model)  # partition files and checkpoints use the original module's names
    if isinstance(partition, (str, Path)) and str(partition) == "default":
        partition = default_partition(model, kwargs.pop("n_heads", None))
    options = {
        "params": param_groups_no_decay(model, args.weight_decay),
        "partition": partition,
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
    return AdamMini, {**options, **kwargs}


def adam_mini_from_training_args(
    model: nn.Module, args: Any, *, partition: Partition | str | Path = "default", **kwargs: Any
) -> AdamMini:
    """An :class:`AdamMini` for ``model`` with the hyperparameters of ``args`` (``TrainingArguments``):
    what :func:`trainer_optimizer_cls_and_kwargs` describes, built. Pass it as
    ``Trainer(..., optimizers=(optimizer, None))``."""
    optimizer_cls, options = trainer_optimizer_cls_and_kwargs(model, args, partition=partition, **kwargs)
    return optimizer_cls(**options)
