"""Collects the SmolLM2 prompt-based runs of `zokernels train lm --model smollm2` (issue 14) into
bench/results/lm_prompt_smollm2.csv and prints the markdown table of docs/lm.md.

    .venv/bin/python bench/lm_prompt_table.py runs/smol [--partial]

Reads <runs>/zero_shot/zero_shot_result.json (the starting point) and <runs>/<method>_<params>/<method>_result.json;
a run without a result yet is listed from its CSV log as 'running' (its last logged step; no accuracy).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import append_csv_rows, run_metadata  # noqa: E402


def rows_of(root: Path) -> list[dict]:
    rows = []
    zero = root / "zero_shot" / "zero_shot_result.json"
    if zero.exists():
        z = json.loads(zero.read_text())
        rows.append({"run": "zero_shot", "method": "zero-shot", "params": "-", "lr": "", "mu": "", "steps": 0,
                     "forwards": 0, "wall_s": "", "cpu_s": "", "peak_rss_mib": z["peak_rss_mib"], "tuned_params": 0,
                     "val_acc": "", "test_acc": z["zero_shot"]["test_acc"], "test_loss": z["zero_shot"]["test_loss"],
                     "eval_wall_s": z["zero_shot"]["seconds"], "status": "done", **_split(z["args"])})
    for run in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "zero_shot"):
        results = list(run.glob("*_result.json"))
        if results:
            r = json.loads(results[0].read_text())
            a = r["args"]
            rows.append({"run": run.name, "method": r["method"], "params": a["params"], "lr": r["lr"], "mu": a["mu"],
                         "steps": r["steps"], "forwards": r["forwards"], "wall_s": r["seconds"],
                         "cpu_s": r["cpu_seconds"], "peak_rss_mib": r["peak_rss_mib"],
                         "tuned_params": r["tuned_params"], "val_acc": r["val_acc"], "test_acc": r["test_acc"],
                         "test_loss": r["test_loss"], "eval_wall_s": "", "status": "done", **_split(a)})
            continue
        logs = list(run.glob("*.csv"))
        if logs:
            last = list(csv.DictReader(open(logs[0], newline="")))
            if last:
                rows.append({"run": run.name, "method": logs[0].stem, "steps": last[-1]["step"],
                             "forwards": last[-1]["forwards"], "wall_s": last[-1]["seconds"], "status": "running"})
    return rows


def _split(a: dict) -> dict:
    return {"model": a.get("model_dir") or a.get("model"), "seed": a["seed"], "n_train": a["n_train"],
            "n_val": a["n_val"], "n_test": a["n_test"], "batch_size": a["batch_size"], "max_length": a["max_length"],
            "budget_forwards": a["budget_forwards"], "mezo_mode": a.get("mezo_mode"),
            "template": (a.get("template") or "").replace("\n", "\\n")}


def fmt(value, spec: str) -> str:
    return "" if value in ("", None) else format(float(value), spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the folder holding zero_shot/ and <method>_<params>/ runs")
    parser.add_argument("--no-csv", action="store_true", help="print the table only")
    args = parser.parse_args()
    rows = rows_of(args.runs)
    print("| method | tuned | lr / mu | steps | forwards | wall s | CPU s | peak RSS MiB | val acc | test acc | "
          "test loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tuned = f"{r.get('params', '')} ({int(r['tuned_params']):,})" if r.get("tuned_params") else "-"
        rate = f"{r['lr']:g} / {r['mu']:g}" if r.get("lr") not in ("", None) else "-"
        print(f"| {r['method']} | {tuned} | {rate} | {r['steps']} | {r['forwards']} | {fmt(r.get('wall_s'), '.0f')} | "
              f"{fmt(r.get('cpu_s'), '.0f')} | {fmt(r.get('peak_rss_mib'), '.0f')} | {fmt(r.get('val_acc'), '.4f')} | "
              f"{fmt(r.get('test_acc'), '.4f')} | {fmt(r.get('test_loss'), '.4f')} |" +
              (f" (running: {r['run']})" if r["status"] == "running" else ""))
    if not args.no_csv:
        meta = run_metadata()
        print("CSV:", append_csv_rows("lm_prompt_smollm2.csv", [{**meta, **r} for r in rows]))


if __name__ == "__main__":
    main()
