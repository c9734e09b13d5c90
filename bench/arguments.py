"""argparse types for the bench scripts' counts and sizes: a value no run can use (0 steps, a
negative lr) is refused when the command line is parsed, not dropped or run into later."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An int >= 1 (steps, elements, bytes)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """An int >= 0 (warm-up steps)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (times in ms, a bandwidth)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite float >= 0 (a learning rate, a time budget in s: NaN is refused, ``elapsed > nan``
    is never true and would switch the budget off)."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value
