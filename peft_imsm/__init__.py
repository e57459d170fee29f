"""peft-imsm: IMSM ("Interweaving Memories of a Siamese LLM") as a peft method.

``import peft_imsm`` registers the method with peft under the type ``IMSM``; then::

    model = get_peft_model(base_model, IMSMConfig(adapter_config=LoraConfig(...)))

Modules, in import order (each imports only those before it): ``peft_type`` (the enum member), ``gate``, ``query``,
``cache``, ``anchors`` (anchor config, sampling, KL), ``config`` (``IMSMConfig``), ``dual_pass`` (the two views),
``model`` (``IMSMModel``, the peft tuner), ``callbacks`` (Trainer callbacks), ``registration`` (peft registration);
then the tools built on them: ``retrofit`` (``peft_imsm.retrofit.retrofit``: a gate for an adapter you already have,
and ``train_gate``), ``gate_map`` (per-token gate values and their picture), ``sft`` (``imsm-sft``).
"""

from .anchors import AnchorConfig
from .callbacks import AdaLoraBudgetCallback, IMSMLogCallback
from .config import IMSMConfig
from .gate import IMSMGate
from .gate_map import GateMap
from .model import IMSMModel, find_imsm_tuner, prepare_anchors, set_anchor_data
from .peft_type import IMSM_PEFT_TYPE
from .registration import register
from .retrofit import GateTrainingLog, train_gate

register()

__version__ = "0.1.0"

__all__ = [
    "IMSMConfig",
    "IMSMModel",
    "IMSMGate",
    "AnchorConfig",
    "set_anchor_data",
    "prepare_anchors",
    "find_imsm_tuner",
    "train_gate",
    "GateTrainingLog",
    "GateMap",
    "AdaLoraBudgetCallback",
    "IMSMLogCallback",
    "IMSM_PEFT_TYPE",
    "__version__",
]
