"""``anomaly-ae-inspect BUNDLE PATH... [--threshold X | --false-alarm-rate F] [--csv out.csv]``

Judges image files (folders are searched recursively) with an inspection bundle and prints
one row per file. A file that cannot be judged gets a row with its error; the exit status
is 0 as long as the bundle loaded (2: bad arguments or bundle).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from anomaly_ae.runtime.bundle import BundleError, Verdict, load_bundle
from anomaly_ae.runtime.preprocess import find_files


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly-ae-inspect",
        description="Judge images with an anomaly-ae inspection bundle (onnxruntime; no torch).",
    )
    parser.add_argument(
        "bundle", help="bundle folder (model.onnx + bundle.json) from `kedro run --pipeline=export`"
    )
    parser.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument(
        "--threshold", type=float, help="anomalous when score > THRESHOLD (default: calibrated)"
    )
    limit.add_argument(
        "--false-alarm-rate",
        type=float,
        metavar="F",
        help="use the threshold that about F (e.g. 0.01) of the normal validation images exceed",
    )
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    parser.add_argument("--batch-size", type=int, default=16, help="images scored at once (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    return parser


def _table(verdicts: list[Verdict]) -> str:
    header = ("file", "score", "verdict", "size", "error")
    rows = []
    for v in verdicts:
        verdict = "ERROR" if v.error else ("ANOMALY" if v.is_anomalous else "ok")
        size = f"{v.width}x{v.height}" if v.width is not None else ""
        score = f"{v.score:.6f}" if v.score is not None else ""
        rows.append((v.file, score, verdict, size, v.error or ""))
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header[:4], widths, strict=True)) + "  error"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        print("anomaly-ae-inspect: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(args.bundle, threads=args.threads)
        limit = bundle.resolve_threshold(args.threshold, args.false_alarm_rate)
    except (BundleError, ValueError, OSError) as exc:
        print(f"anomaly-ae-inspect: {exc}", file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not Path(p).exists()]
    files = find_files([p for p in args.paths if Path(p).exists()])
    verdicts = [Verdict(file=str(p), error="FileNotFoundError: no such file or folder") for p in missing]
    verdicts += bundle.iter_inspect(((str(f), f) for f in files), threshold=limit, batch_size=args.batch_size)
    manifest = bundle.manifest
    if args.threshold is not None:
        source = "given"
    elif args.false_alarm_rate is not None:
        n = manifest["validation_scores"]["n"]
        source = f"false-alarm rate {args.false_alarm_rate:g} on {n} normal validation images"
    else:
        source = f"calibrated ({bundle.manifest['threshold'].get('rule')})"
    low, high = bundle.expected_false_alarm_rate(limit)
    print(
        f"bundle {bundle.path} | category {manifest.get('category')} | model {bundle.fingerprint} | "
        f"score {manifest['score']['description']} | threshold {limit:.6f} ({source}; a normal image "
        f"like the {manifest['validation_scores']['n']} validation images is flagged at "
        f"{100 * low:.3g}-{100 * high:.3g} %)"
    )
    print(_table(verdicts))
    n_bad = sum(v.error is not None for v in verdicts)
    n_anomalous = sum(bool(v.is_anomalous) for v in verdicts)
    print(
        f"{len(verdicts)} files: {n_anomalous} anomalous, "
        f"{len(verdicts) - n_anomalous - n_bad} ok, {n_bad} not judged"
    )
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*Verdict.COLUMNS, "threshold"])
            writer.writeheader()
            for v in verdicts:
                writer.writerow({**v.row(), "threshold": limit})
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
