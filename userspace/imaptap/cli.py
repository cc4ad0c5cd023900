def main(argv=None) -> int:
    raise SystemExit("imaptap: not built yet")
