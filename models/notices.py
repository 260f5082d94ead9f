"""What the outbox carries: the kinds of message and a row's delivery status."""

from enum import StrEnum


class MessageKind(StrEnum):
    RMA_ISSUED = "rma_issued"
    DECLINED = "declined"
    RECEIVED = "received"
    PROCESSED = "processed"
    EXPIRED = "expired"
    REVIEW_NEEDED = "review_needed"
    DUE_SOON = "due_soon"
    OVERDUE = "overdue"
    ESCALATED = "escalated"  # to Customer Care: an automation escalated the return (overdue, or a stage run failed)
    WEBHOOK = "webhook"  # not an email: a signed POST of one transition to a storefront's endpoint


CUSTOMER_KINDS = frozenset({MessageKind.RMA_ISSUED, MessageKind.DECLINED, MessageKind.RECEIVED,
                            MessageKind.PROCESSED, MessageKind.EXPIRED})
CARE_KINDS = frozenset({MessageKind.REVIEW_NEEDED, MessageKind.DUE_SOON, MessageKind.OVERDUE,
                        MessageKind.ESCALATED})
EMAIL_KINDS = CUSTOMER_KINDS | CARE_KINDS


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
