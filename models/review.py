"""An operator's review decision: a decision and a reason code from fixed lists (selects in the Prefect form), and
the audit note they make together."""

from __future__ import annotations

from enum import StrEnum

from models.errors import InvalidInput


class Decision(StrEnum):
    AUTHORIZE = "authorize"
    DECLINE = "decline"


class ReviewReason(StrEnum):
    EXPIRY_CHECKED = "expiry_checked"  # the lot's expiration date was checked (P4, R2)
    DAMAGE_CONFIRMED = "damage_confirmed"  # damage in transit back confirmed (R12)
    NOT_ELIGIBLE = "not_eligible"
    CUSTOMER_WITHDREW = "customer_withdrew"
    OTHER = "other"


# Reasons that can only end in a decline: authorizing a return "not eligible" or "withdrawn" contradicts itself.
DECLINE_ONLY = frozenset({ReviewReason.NOT_ELIGIBLE, ReviewReason.CUSTOMER_WITHDREW})
MAX_NOTE = 1000


def review_note(decision: Decision, reason: ReviewReason, note: str) -> str:
    """The audit note "<reason>: <note>"; InvalidInput for a contradictory pair, an unexplained "other" or a note
    that is too long or has control characters."""
    note = note.strip()
    if len(note) > MAX_NOTE or any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in note):
        raise InvalidInput(f"the note must be at most {MAX_NOTE} printable characters")
    if decision is Decision.AUTHORIZE and reason in DECLINE_ONLY:
        raise InvalidInput(f"reason {reason} goes with decline, not authorize")
    if reason is ReviewReason.OTHER and not note:
        raise InvalidInput("reason other needs a note saying why")
    return f"{reason}: {note}" if note else str(reason)
