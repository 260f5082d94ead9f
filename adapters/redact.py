"""Keep personal data out of logs: email addresses and phone numbers become <email> and <phone>.

Prefect ships flow- and task-run logs to its API and shows them in the UI; our own logs carry ids (RMA, order
number), but an exception message or a library may still carry an address. The filter rewrites each record's
message, arguments and formatted exception before any handler sees them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

EMAIL = re.compile(r"[^\s<>@\"',;:()\[\]]+@[^\s<>@\"',;:()\[\]]+\.[^\s<>@\"',;:()\[\].]+")
# US numbers as people write them: 1-855-791-5800, (561) 555-0123, +1 561 555 0123, 561.555.0123. The last
# separator is required, so ids, amounts, dates and bare digit runs are left alone.
PHONE = re.compile(r"(?<![\w+])(?:\+?1[\s.-]?)?(?:\(\d{3}\)|\d{3})[\s.-]?\d{3}[\s.-]\d{4}(?![\w-])")
LOGGERS = ("", "prefect", "prefect.flow_runs", "prefect.task_runs")


def redact(text: str) -> str:
    """The text with every email address and phone number replaced."""
    return PHONE.sub("<phone>", EMAIL.sub("<email>", text))


def _arg(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value  # keeps %d and %.2f working; a number alone is not a phone number here
    text = str(value)
    clean = redact(text)
    return value if clean == text else clean


class RedactPersonalData(logging.Filter):
    """Replaces email addresses and phone numbers in a record's message, args and exception text; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _arg(record.msg)
        if isinstance(record.args, Mapping):
            record.args = {k: _arg(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(_arg(a) for a in record.args)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redaction(names: tuple[str, ...] = LOGGERS) -> RedactPersonalData:
    """Put the filter on the root and Prefect's run loggers and on their handlers (a logger's own filter does not
    see records its children propagate; a handler's does). Idempotent."""
    flt = next((f for f in logging.getLogger().filters if isinstance(f, RedactPersonalData)), RedactPersonalData())
    for name in names:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, RedactPersonalData) for f in target.filters):
                target.addFilter(flt)
    return flt
