"""Benchmark runner (being written)."""


def main(argv: list[str]) -> int:
    raise SystemExit("shoal bench is not written yet")
