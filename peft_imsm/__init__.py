"""peft-imsm: IMSM ("Interweaving Memories of a Siamese LLM") as a peft method.

``import peft_imsm`` registers the method with peft under the type ``IMSM``; then::

    model = get_peft_model(base_model, IMSMConfig(adapter_config=LoraConfig(...)))

What users call is listed in ``__all__``; internals stay importable from their modules.

Modules, in import order (each imports only those before it): ``peft_type`` (the enum member), ``extras`` (optional
dependencies, or an ImportError that names the extra to install), ``gate``, ``query``, ``cache``, ``padding``,
``backbone`` (what IMSM reads of a causal LM), ``losses`` (the loss terms: anchor KL, routing term; torch only),
``gate_stats`` (``record_gate``, the logged sums), ``anchors`` (anchor config, sampling), ``config`` (``IMSMConfig``),
``dual_pass`` (the two views), ``anchor_term`` (``AnchorRegularizer``: the anchor and routing terms added to the
loss), ``save_load`` (peft's save/load hooks), ``tuner_interface`` (what IMSM supports of peft's ``BaseTuner``),
``model`` (``IMSMModel``, the peft tuner), ``callbacks`` (Trainer callbacks), ``registration`` (peft registration);
then the tools built on them: ``retrofitting`` (:func:`retrofit`: a gate for an adapter you already have),
``gate_training`` (:func:`train_gate`: that gate trained on stored states), ``gate_maps`` (:func:`gate_map`: per-token
gate values and their picture), ``sft`` (``imsm-sft``). The benchmark, ``imsm_bench``, is a separate package that
builds on these.
"""

from .anchors import AnchorConfig, chat_end_tokens, chat_start_tokens
from .callbacks import AdaLoraBudgetCallback, IMSMLogCallback
from .config import IMSMConfig
from .gate_maps import GateMap, gate_map
from .gate_training import GateTrainingLog, train_gate
from .model import IMSMModel, prepare_anchors, set_anchor_data
from .registration import register
from .retrofitting import load_library, retrofit

register()

__version__ = "0.1.0"

__all__ = [
    "IMSMConfig",
    "AnchorConfig",
    "chat_end_tokens",
    "chat_start_tokens",
    "set_anchor_data",
    "prepare_anchors",
    "retrofit",
    "load_library",
    "train_gate",
    "GateTrainingLog",
    "gate_map",
    "GateMap",
    "IMSMLogCallback",
    "AdaLoraBudgetCallback",
    "IMSMModel",
    "__version__",
]
