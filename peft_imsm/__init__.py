"""peft-imsm: IMSM ("Interweaving Memories of a Siamese LLM") as a peft method.

``import peft_imsm`` registers the method with peft under the type ``IMSM``; then::

    model = get_peft_model(base_model, IMSMConfig(adapter_config=LoraConfig(...)))
"""

from .anchors import AnchorConfig, IMSMLogCallback, prepare_anchors, set_anchor_data
from .callbacks import AdaLoraBudgetCallback
from .config import IMSMConfig
from .gate import IMSMGate
from .model import IMSMModel
from .registration import IMSM_PEFT_TYPE, register

register()

__version__ = "0.1.0"

__all__ = [
    "IMSMConfig",
    "IMSMModel",
    "IMSMGate",
    "AnchorConfig",
    "set_anchor_data",
    "prepare_anchors",
    "AdaLoraBudgetCallback",
    "IMSMLogCallback",
    "IMSM_PEFT_TYPE",
    "__version__",
]
