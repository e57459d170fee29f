"""``PeftType.IMSM``: the enum member peft needs for a registered method (a leaf module: imports nothing of ours)."""

from __future__ import annotations

from peft.utils.peft_types import PeftType

IMSM_NAME = "IMSM"


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to peft's ``PeftType`` enum (idempotent) and return the member.

    Why patch: peft's ``register_peft_method`` requires the method's name to be a ``PeftType`` member, and Python
    enums cannot be extended through a public API. ``PeftType`` is a ``str`` enum, so a member is a ``str``
    instance of the class registered in the enum's three lookup tables (by name, by value, and the ordered names).
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


IMSM_PEFT_TYPE: PeftType = _add_peft_type_member(IMSM_NAME)
