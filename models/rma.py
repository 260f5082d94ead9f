"""RMA numbers: RMA- plus six Crockford base-32 symbols and a Luhn mod 32 check symbol."""

import re
import secrets

from models.errors import InvalidInput

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford: no I, L, O, U
_BODY = 6
_CANON = re.compile(rf"^RMA-[{ALPHABET}]{{{_BODY + 1}}}$")
# Crockford decoding: letters people confuse with digits read as the digit.
_CONFUSABLE = str.maketrans({"O": "0", "I": "1", "L": "1"})


def _check_symbol(body: str) -> str:
    """Luhn mod N over the alphabet: catches every single-symbol error and adjacent swap of distinct symbols."""
    n = len(ALPHABET)
    total = 0
    factor = 2
    for ch in reversed(body):
        addend = factor * ALPHABET.index(ch)
        total += addend // n + addend % n
        factor = 1 if factor == 2 else 2
    return ALPHABET[(n - total % n) % n]


def new_rma(token: bytes | None = None) -> str:
    """A fresh RMA number; `token` (>= 6 bytes) makes it deterministic for tests."""
    raw = token if token is not None else secrets.token_bytes(_BODY)
    body = "".join(ALPHABET[b % len(ALPHABET)] for b in raw[:_BODY])
    return f"RMA-{body}{_check_symbol(body)}"


def parse_rma(text: object) -> str:
    """The canonical RMA from what a person typed; InvalidInput if malformed or the check symbol is wrong."""
    if not isinstance(text, str) or len(text) > 40:
        raise InvalidInput("an RMA number looks like RMA-7K2QMXP")
    cleaned = re.sub(r"[\s-]", "", text.upper()).translate(_CONFUSABLE)
    if cleaned.startswith("RMA"):
        cleaned = cleaned[3:]
    if len(cleaned) != _BODY + 1 or any(ch not in ALPHABET for ch in cleaned):
        raise InvalidInput("an RMA number looks like RMA-7K2QMXP")
    body, check = cleaned[:_BODY], cleaned[_BODY]
    if _check_symbol(body) != check:
        raise InvalidInput("that RMA number is not valid (check character mismatch): please re-type it")
    return f"RMA-{cleaned}"


def is_canonical(rma: str) -> bool:
    """True when `rma` is already in the stored form."""
    return bool(_CANON.match(rma))
