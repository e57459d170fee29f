"""Registration of IMSM with peft, and the one patch of peft's adapter layers. The last module to import.

``import peft_imsm`` runs :func:`register` once; running it again is a no-op. The two places where peft's internals
are touched are here and in :mod:`peft_imsm.peft_type` (the enum member).
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from peft.utils.peft_types import register_peft_method

from .config import IMSMConfig
from .dual_pass import in_frozen_view
from .model import IMSMModel
from .peft_type import IMSM_NAME, IMSM_PEFT_TYPE


def _disable_adapters(self) -> bool:
    return self._disable_adapters or in_frozen_view()


def _patch_adapter_switch() -> None:
    """Make peft's ``disable_adapters`` property also read IMSM's per-thread frozen-view switch.

    Why patch: IMSM's frozen view is the model with every adapter layer off. peft switches layers off with a flag on
    each layer object (``_disable_adapters``), which every thread shares: flipping it for one thread's frozen pass
    made a concurrent call in another thread run without its adapter. peft's layers read the flag through the
    ``disable_adapters`` property of ``BaseTunerLayer`` and ``AuxiliaryTrainingWrapper`` (modules_to_save,
    trainable tokens); the patched property returns peft's own flag OR the frozen-view switch, a ``ContextVar``
    that is False everywhere except inside :func:`peft_imsm.dual_pass.frozen_view` in the thread that entered it.
    Models without IMSM are unaffected (the switch is never set for them).
    """
    for cls in (BaseTunerLayer, AuxiliaryTrainingWrapper):
        if getattr(cls.disable_adapters, "fget", None) is not _disable_adapters:
            cls.disable_adapters = property(_disable_adapters, doc=cls.disable_adapters.__doc__)


def register() -> None:
    """Register IMSM's config and tuner classes with peft and patch the adapter switch (idempotent)."""
    _patch_adapter_switch()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(IMSM_PEFT_TYPE) is IMSMConfig:
        return
    register_peft_method(name=IMSM_NAME.lower(), config_cls=IMSMConfig, model_cls=IMSMModel, prefix="imsm_")
