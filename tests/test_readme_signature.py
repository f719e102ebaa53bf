"""The README's constructor block ("The callback") is NTKReportCallback's real signature.

The block is parsed as a Python call; its keyword arguments must be the constructor's
parameters, all of them, in the same order, with the same default values.
"""

from __future__ import annotations

import ast
import inspect
import os

from ntk_callback import NTKReportCallback

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_signature() -> list[tuple[str, object]]:
    """``(name, default)`` of every keyword in the first code block of "## The callback"."""
    text = open(README, encoding="utf-8").read()
    section = text.split("\n## The callback", 1)[1].split("\n## ", 1)[0]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    call = ast.parse(block, mode="eval").body
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
    assert call.func.id == "NTKReportCallback" and not call.args
    return [(str(kw.arg), ast.literal_eval(kw.value)) for kw in call.keywords]


def test_readme_signature_block_matches_the_constructor() -> None:
    params = list(inspect.signature(NTKReportCallback.__init__).parameters.values())[1:]
    real = [(p.name, p.default) for p in params]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    documented = readme_signature()
    assert [n for n, _ in documented] == [n for n, _ in real], (
        "README.md 'The callback': the signature block's arguments differ from "
        "NTKReportCallback.__init__ (names or order); copy them from inspect.signature"
    )
    for (name, shown), (_, default) in zip(documented, real):
        assert shown == default and type(shown) is type(default), (
            f"README.md 'The callback': {name}={shown!r}, but the constructor's default is {default!r}"
        )
