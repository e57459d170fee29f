"""Trainer callbacks for IMSM models: IMSM's figures in the logs, and AdaLoRA's budget schedule."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .model import find_imsm_tuner


class IMSMLogCallback(TrainerCallback):
    """Adds IMSM's own figures to the Trainer's logs (means since the previous log):

    * ``gate_mean``: the gate (weight of the frozen view) on the supervised tokens of the training batches;
    * ``anchor_gate_mean``: the same on the anchors (with an anchor section);
    * ``anchor_kl``: the anchor KL before weighting, and ``task_loss`` next to the Trainer's ``loss`` (which
      includes the weighted anchor term).

    ::

        trainer = SFTTrainer(model=model, ..., callbacks=[peft_imsm.IMSMLogCallback()])
    """

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or model is None:
            return
        tuner = find_imsm_tuner(model, required=False)
        if tuner is None:
            return
        stats = tuner.pop_training_stats()
        if stats:
            # The Trainer appends a copy of `logs` to `state.log_history` before calling `on_log`: update both.
            logs.update(stats)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)


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
        tuner = _find_adalora_tuner(kwargs.get("model"))
        if tuner is None:
            raise ValueError(
                "AdaLoraBudgetCallback is attached but the model has no AdaLoRA adapter: remove the callback or "
                "wrap an AdaLoraConfig."
            )
        # Trainer's global_step is incremented after on_optimizer_step; AdaLoRA counts from 0 like its docs' loop.
        tuner.update_and_allocate(state.global_step)


def _find_adalora_tuner(model: Any) -> Any:
    from peft.tuners.adalora import AdaLoraModel

    imsm = find_imsm_tuner(model, required=False)
    if imsm is not None:
        return imsm.adapter_tuner if isinstance(imsm.adapter_tuner, AdaLoraModel) else None
    for _ in range(8):
        if isinstance(model, AdaLoraModel) or model is None:
            return model
        model = getattr(model, "module", None) or getattr(model, "base_model", None)
    return None
