"""Trainer callbacks for IMSM models."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class AdaLoraBudgetCallback(TrainerCallback):
    """Runs AdaLoRA's rank-budget schedule under the HF ``Trainer`` (and TRL's trainers).

    AdaLoRA must call ``update_and_allocate(global_step)`` after every optimizer step, while the gradients are still
    there (before ``zero_grad``). The ``Trainer`` does not know this; this callback does it in
    ``on_optimizer_step``. Works for IMSM models wrapping AdaLoRA and for plain AdaLoRA peft models::

        trainer = SFTTrainer(model=model, ..., callbacks=[AdaLoraBudgetCallback()])

    Remember to set ``AdaLoraConfig(total_step=...)`` to the number of optimizer steps of the run.
    """

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        tuner = _find_adalora_tuner(model)
        if tuner is None:
            raise ValueError(
                "AdaLoraBudgetCallback is attached but the model has no AdaLoRA adapter: remove the callback or "
                "wrap an AdaLoraConfig."
            )
        # Trainer's global_step is incremented after on_optimizer_step; AdaLoRA counts from 0 like its docs' loop.
        tuner.update_and_allocate(state.global_step)


def _find_adalora_tuner(model: Any) -> Any:
    from peft.tuners.adalora import AdaLoraModel

    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, AdaLoraModel):
            return model
        inner = getattr(model, "__dict__", {}).get("adapter_tuner")
        if isinstance(inner, AdaLoraModel):
            return inner
        model = getattr(model, "module", None) or getattr(model, "base_model", None)
        seen += 1
    return None
