"""Number formatting and markdown tables shared by the parser's text outputs."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from cores.evaluation import wilson_ci


def fmt(v, spec: str = "{:.2f}") -> str:
    return "n/a" if v is None else spec.format(v)


def rate_text(k: int, n: int) -> str:
    """`50% [15%, 85%] (1/2)`: a rate with its 95 % Wilson interval and counts."""
    if n == 0:
        return "n/a"
    lo, hi = wilson_ci(k, n)
    return f"{k / n:.0%} [{lo:.0%}, {hi:.0%}] ({k}/{n})"


def ci_text(c: Dict[str, Optional[float]], spec: str = "{:+.2f}") -> str:
    """`+1.23 [0.50, 1.96] (n=8)`: a mean with its 95 % t interval."""
    if c.get("mean") is None:
        return "n/a"
    if c.get("low") is None:
        return f"{fmt(c['mean'], spec)} (n={c['n']})"
    return f"{fmt(c['mean'], spec)} [{fmt(c['low'], spec)}, {fmt(c['high'], spec)}] (n={c['n']})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
