"""The one-line error messages every CLI prints (train, eval, the tables): `one_line(e)`."""
from __future__ import annotations


def one_line(e: BaseException, *, with_type: bool = False) -> str:
    """The first line of `e`'s message (its type's name when the message is empty), stripped of
    the quotes a KeyError adds; `with_type` prefixes the type's name ("OSError: ...")."""
    lines = str(e).strip().splitlines()
    msg = lines[0].strip().strip("'\"") if lines else ""
    if with_type:
        return f"{type(e).__name__}: {msg}".strip()
    return msg or type(e).__name__
