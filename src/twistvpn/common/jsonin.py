"""JSON from peers that may be hostile: the admin API's bodies, the local API's requests."""

from __future__ import annotations

import json
from typing import Any


def loads(data: str | bytes) -> Any:
    """
    C{json.loads}, with every way it can fail on bad input a C{ValueError}:
    a document nested deeper than the interpreter's recursion limit raises
    C{RecursionError}, which is not one.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None
