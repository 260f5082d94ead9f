"""The return lifecycle: nine states and the one table of allowed transitions (docs/architecture.md)."""

from enum import StrEnum

from models.errors import InvalidTransition


class State(StrEnum):
    REQUESTED = "requested"
    REVIEW = "review"
    DECLINED = "declined"
    AUTHORIZED = "authorized"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    RECEIVED = "received"
    PROCESSING = "processing"
    COMPLETED = "completed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.REQUESTED: frozenset({State.AUTHORIZED, State.DECLINED, State.REVIEW}),
    State.REVIEW: frozenset({State.AUTHORIZED, State.DECLINED, State.PROCESSING}),
    State.DECLINED: frozenset(),
    State.AUTHORIZED: frozenset({State.RECEIVED, State.EXPIRED, State.CANCELLED}),
    State.EXPIRED: frozenset(),
    State.CANCELLED: frozenset(),
    State.RECEIVED: frozenset({State.PROCESSING, State.REVIEW}),
    State.PROCESSING: frozenset({State.COMPLETED, State.REVIEW}),
    State.COMPLETED: frozenset(),
}

TERMINAL: frozenset[State] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


# States that move money or goods: only a return whose parcel was received may enter them (refund after receipt).
NEEDS_RECEIPT: frozenset[State] = frozenset({State.PROCESSING, State.COMPLETED})


def check_transition(current: State, target: State, *, received: bool = True) -> None:
    """Raise InvalidTransition unless the table allows current -> target and, for processing, the parcel is in."""
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(f"a return in state '{current}' cannot become '{target}'")
    if target in NEEDS_RECEIPT and not received:
        raise InvalidTransition(f"a return cannot become '{target}' before its parcel is received")
