"""CI: check what a MemControl run promises: its output files exist and the table it printed parses.

    python .ci/check_outputs.py OUTPUT_DIR LOG [--spaces svdiff,difffit,attention]
"""

import argparse
import json
import os
import sys


def fail(message: str) -> None:
    print(f"check_outputs: {message}", file=sys.stderr)
    sys.exit(1)


def printed_table(log: str) -> list[list[str]]:
    """The last markdown table in the log, as rows of cells (header and separator dropped)."""
    tables, current = [], []
    for line in open(log, encoding="utf-8", errors="replace").read().splitlines():
        if line.startswith("|") and line.endswith("|"):
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    if not tables:
        fail(f"no table printed in {log}")
    table = tables[-1]
    header, rows = table[0], table[2:]
    if header[:2] != ["Method", "Mitigation"] or not rows:
        fail(f"the printed table has header {header} and {len(rows)} rows")
    for row in rows:
        if len(row) != len(header):
            fail(f"row {row} has {len(row)} cells, the header {len(header)}")
        for cell in row[2:]:
            try:
                float(cell.replace(",", ""))
            except ValueError:
                if cell not in ("—", "n/a"):
                    fail(f"cell {cell!r} of row {row[:2]} is not a number")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("log")
    parser.add_argument("--spaces", default="")
    args = parser.parse_args()
    out = args.output_dir
    needed = ["results.md", "results.json", "pareto.png", "memorization.png", "best_mask.json", "search_summary.json"]
    for space in filter(None, args.spaces.split(",")):
        needed += [f"search/{space}/pareto.json", f"search/{space}/trials.csv"]
    missing = [n for n in needed if not os.path.isfile(os.path.join(out, n))]
    if missing:
        fail(f"missing outputs in {out}: {missing}")
    for figure in ("pareto.png", "memorization.png"):
        with open(os.path.join(out, figure), "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                fail(f"{figure} is not a PNG file")
    results = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
    rows = printed_table(args.log)
    if len(rows) != len(results):
        fail(f"the printed table has {len(rows)} rows, results.json {len(results)}")
    methods = {r[0] for r in rows}
    if not {"Freeze", "MemControl"} <= methods:
        fail(f"the table lacks Freeze or MemControl rows: {sorted(methods)}")
    print(f"check_outputs: {out}: {len(needed)} files and a {len(rows)}-row table, all present and parsed")


if __name__ == "__main__":
    main()
