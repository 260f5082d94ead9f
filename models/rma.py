"""RMA numbers: RMA- plus six symbols and a check symbol, from a 31-symbol Crockford-style alphabet."""

import re
import secrets

from models.errors import InvalidInput

# Crockford's base 32 less Z (it reads as 2): 31 symbols, a prime, so the weighted check below is exact.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXY"
_BODY = 6
_CANON = re.compile(rf"^RMA-[{ALPHABET}]{{{_BODY + 1}}}$")
# Crockford decoding: letters people confuse with digits read as the digit.
_CONFUSABLE = str.maketrans({"O": "0", "I": "1", "L": "1"})


def _check_symbol(body: str) -> str:
    """Weighted sum mod 31 (weights 1..7, the check symbol weighted 7): with 31 prime and symbol values below
    31, every single-symbol error and every adjacent swap of distinct symbols changes the sum."""
    n = len(ALPHABET)
    total = sum((i + 1) * ALPHABET.index(ch) for i, ch in enumerate(body))
    weight = len(body) + 1
    # choose c with total + weight * c == 0 (mod n)
    return ALPHABET[(-total * pow(weight, -1, n)) % n]


def new_rma(token: bytes | None = None) -> str:
    """A fresh RMA number; `token` (>= 6 bytes) makes it deterministic for tests."""
    raw = token if token is not None else secrets.token_bytes(_BODY)
    body = "".join(ALPHABET[b % len(ALPHABET)] for b in raw[:_BODY])
    return f"RMA-{body}{_check_symbol(body)}"


def parse_rma(text: object) -> str:
    """The canonical RMA from what a person typed or a scanner sent; InvalidInput if missing, malformed or the check
    symbol is wrong."""
    if not isinstance(text, str) or len(text) > 40:
        raise InvalidInput("not one of our RMA numbers: an RMA number looks like RMA-7K2QMXP")
    # A scanner set to transmit Code 39's start/stop characters sends the label's barcode as *RMA-7K2QMXP*.
    cleaned = re.sub(r"[\s-]", "", text.upper()).strip("*").translate(_CONFUSABLE)
    if not cleaned:
        raise InvalidInput("no RMA number: scan the barcode on the label, or type what is written on the box (an RMA "
                           "number looks like RMA-7K2QMXP)")
    if cleaned.startswith("RMA"):
        cleaned = cleaned[3:]
    if len(cleaned) != _BODY + 1 or any(ch not in ALPHABET for ch in cleaned):
        raise InvalidInput("not one of our RMA numbers: an RMA number looks like RMA-7K2QMXP")
    body, check = cleaned[:_BODY], cleaned[_BODY]
    if _check_symbol(body) != check:
        raise InvalidInput("that RMA number is not valid (check character mismatch): please re-type it")
    return f"RMA-{cleaned}"


def is_canonical(rma: str) -> bool:
    """True when `rma` is already in the stored form."""
    return bool(_CANON.fullmatch(rma))
