"""transformers.Trainer with LOTION's default curvature: `curvature_step` once per optimizer step.

The default `curvature="gn_sampled"` refreshes `g` only in `lotion_fx.curvature_step`, which the
training loop must call once per optimizer step. Trainer owns its loop, so use this subclass:

    from lotion_fx.hf_trainer import LotionTrainer
    model = lotion_fx.prepare(model, lotion_fx.LotionConfig(format="int4"), capture="dynamo")
    LotionTrainer(model=model, args=TrainingArguments(...), train_dataset=ds).train()

or, when you already subclass a Trainer (TRL's SFTTrainer, ...), put the mixin first:
`class MyTrainer(LotionTrainerMixin, SFTTrainer)`. Without either, LOTION gets no curvature and acts
as PTQ (`lotion_fx.penalty(model)` stays 0).

What it does: before the first micro-batch of every optimizer step (a new `state.global_step`; with
gradient accumulation, once per step, not per micro-batch) it calls
`lotion_fx.curvature_step(model, **inputs_without_labels)` on the model Trainer trains (compiled,
DDP-wrapped: both handled). For a causal LM the sampled targets cover exactly the positions its loss
covers (shifted, labels != -100), so `g` is the Gauss-Newton diagonal of the loss Trainer minimises;
for other models, the positions whose label is not -100. `curvature_loss="mse"` for a regression head.

This module imports without transformers; `LotionTrainer` imports it on first access.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .api import is_prepared, prepared_info
from .curvature import _unwrap, curvature_step, first_examples

IGNORE_INDEX = -100  # transformers' label for "no loss here"

__all__ = ["LotionTrainer", "LotionTrainerMixin", "labelled_logits"]  # noqa: F822 (LotionTrainer: __getattr__)


def _is_causal_lm(model: nn.Module) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is there whenever a Trainer is
        return type(model).__name__.endswith("ForCausalLM")
    name = model._get_name() if hasattr(model, "_get_name") else type(model).__name__
    return name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith("ForCausalLM")


def labelled_logits(out: Any, labels: Tensor | None, causal: bool) -> Tensor:
    """The logits of the positions the model's loss covers: (M, vocab) for M labelled positions.

    causal: logits[:, :-1] predict labels[:, 1:] (transformers' causal-LM shift). Without labels, or
    when their shape does not index the logits, all positions.
    """
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    if labels is None or not torch.is_tensor(labels) or labels.is_floating_point():
        return logits
    if causal and labels.dim() >= 2 and logits.shape[:-1] == labels.shape:
        return logits[..., :-1, :][labels[..., 1:] != IGNORE_INDEX]
    if logits.shape[:-1] == labels.shape:
        return logits[labels != IGNORE_INDEX]
    return logits


class LotionTrainerMixin:
    """Calls `lotion_fx.curvature_step` once per optimizer step from `training_step`.

    Keyword arguments (popped before the Trainer sees them):
        curvature_loss: "cross_entropy" (default; LMs and classifiers) or "mse" (regression heads).
        curvature_output_fn: fn(model_output, inputs) -> the predictions whose loss the model
            minimises; default `labelled_logits` (causal-LM shift, labels != -100).
    """

    def __init__(self, *args: Any, curvature_loss: str = "cross_entropy",
                 curvature_output_fn: Callable[[Any, dict], Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.curvature_loss = curvature_loss
        self.curvature_output_fn = curvature_output_fn
        self._lotion_curvature_at: int | None = None  # the global_step curvature_step last ran for

    def training_step(self, model: nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> Tensor:
        step = self.state.global_step
        if self._lotion_curvature_at != step:  # first micro-batch of this optimizer step
            self._lotion_curvature_at = step
            self.lotion_curvature_step(model, inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def lotion_curvature_step(self, model: nn.Module, inputs: dict) -> bool:
        """One `curvature_step` with this micro-batch; True when g was refreshed."""
        inner = _unwrap(model)
        if not is_prepared(inner):  # a wrapper that keeps the prepared model inside (PeftModel)
            inner = next((m for m in inner.modules() if is_prepared(m)), None)
            if inner is None:
                raise TypeError(
                    f"LotionTrainer trains {type(_unwrap(model)).__name__}, which holds no model prepared by "
                    "lotion_fx.prepare(model, config, capture='dynamo'); prepare it before building the Trainer"
                )
            model = inner  # its forward still runs the wrapper's layers (PEFT injects them in place)
        cfg = prepared_info(inner).config
        accum = self.args.gradient_accumulation_steps
        if cfg.method == "lotion" and cfg.grad_accum_steps != accum:
            raise ValueError(
                f"TrainingArguments(gradient_accumulation_steps={accum}) but LotionConfig("
                f"grad_accum_steps={cfg.grad_accum_steps}): prepare with LotionConfig(..., grad_accum_steps={accum}) "
                "so the penalty counts once per optimizer step"
            )
        inputs = self._prepare_inputs(inputs)
        if cfg.method == "lotion":  # the refresh's share of the batch, labels included, so that they match
            _, inputs = first_examples((), inputs, cfg.curvature_batch_fraction)
        label_names = set(self.label_names or ["labels"])
        labels = next((inputs[k] for k in label_names if k in inputs), None)
        feed = {k: v for k, v in inputs.items() if k not in label_names}
        causal = _is_causal_lm(inner)
        user_fn = self.curvature_output_fn
        if user_fn is not None:
            output_fn = lambda out: user_fn(out, inputs)  # noqa: E731
        else:
            output_fn = lambda out: labelled_logits(out, labels, causal)  # noqa: E731
        model.train()
        with self.compute_loss_context_manager():  # curvature_step warns about weights with no gradient
            return curvature_step(model, loss=self.curvature_loss, output_fn=output_fn, batch_fraction=1.0, **feed)


def _build() -> type:
    import transformers

    class LotionTrainer(LotionTrainerMixin, transformers.Trainer):
        """`transformers.Trainer` that calls `lotion_fx.curvature_step` once per optimizer step
        (see the module docstring); takes the Trainer's arguments plus `curvature_loss` and
        `curvature_output_fn`."""

    LotionTrainer.__module__, LotionTrainer.__qualname__ = __name__, "LotionTrainer"
    return LotionTrainer


def __getattr__(name: str) -> Any:  # PEP 562: transformers is imported on first use only
    if name == "LotionTrainer":
        cls = _build()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
