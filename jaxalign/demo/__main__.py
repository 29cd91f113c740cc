"""``python -m jaxalign.demo [--quick] [--out DIR]``: run the demo (see :mod:`jaxalign.demo`)."""

from __future__ import annotations

import time

_START = time.perf_counter()  # wall time counts imports and compilation

import argparse  # noqa: E402
import sys  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxalign.demo", description=(
        "Controlled-sentiment demo: SFT, reward model, PPO, DPO/IPO/ORPO, evaluation."))
    parser.add_argument("--quick", action="store_true",
                        help="small settings for tests (≈1–2 min); targets are not enforced")
    parser.add_argument("--out", default=None, help="run directory (default runs/demo, with"
                        " --task math runs/demo_math)")
    parser.add_argument("--task", choices=("sentiment", "math"), default="sentiment",
                        help="sentiment: the preference-alignment demo (default); math: GRPO"
                        " with a verifiable reward (jaxalign.demo.math_rl)")
    args = parser.parse_args(argv)
    if args.task == "math":
        from jaxalign.demo.math_rl import main as math_main

        return math_main(quick=args.quick, out=args.out, start_time=_START)
    args.out = args.out or "runs/demo"

    from jaxalign.demo.config import FULL, QUICK
    from jaxalign.demo.pipeline import run_demo
    from jaxalign.demo.report import results_table, summary_lines, target_lines

    config = QUICK if args.quick else FULL
    report = run_demo(config, args.out, start_time=_START)
    print()
    print("\n".join(target_lines(report)))
    print()
    print("\n".join(summary_lines(report)))
    print()
    print("\n".join(results_table(report)))
    skipped = report["stages"]["skipped"]
    if skipped:
        print(f"\n{len(skipped)} stage(s) reused from {args.out} (cached): {', '.join(skipped)}")
    verdict = "all targets met" if report["passed"] else "SOME TARGETS FAILED"
    if not report["enforced"]:
        verdict += " (quick mode: not enforced)"
    print(f"\n{verdict}. Report: {args.out}/report.md")
    print(f"Total wall time: {time.perf_counter() - _START:.1f} s")
    return 0 if report["passed"] or not report["enforced"] else 1


if __name__ == "__main__":
    sys.exit(main())
