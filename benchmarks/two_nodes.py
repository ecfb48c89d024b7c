"""Two nodes against one: wall time of the same pipeline on a one-node and a two-node Ray cluster on this machine.

    python benchmarks/two_nodes.py                        # configs/smoke/tiny.yaml + OVERRIDES below, 1 round
    python benchmarks/two_nodes.py --repeats 2 --cpus 2   # total CPUs (split over the two nodes)
    python benchmarks/two_nodes.py --tiny                 # 2-step experts, writes to a temp folder

Each setting gets a fresh cluster from `cluster/local_cluster.py` (token auth on, loopback, stopped by pid):
"one node" is a head with all `--cpus`; "two nodes" is a head plus a second raylet with half each. The same
`ray job submit --working-dir . -- python -m dume_ray run ...` runs on both; the total is the submit
command's wall time (working-dir upload and the driver's start included), the stages' seconds come from
their `DONE.json` manifests (the experts stage's wall time from the driver's last "[experts] N/N finished"
line), and the experts' node ids show they spread over both nodes. Both nodes share
this machine's cores and disk, so this measures what a second node costs in coordination (object transfers
between raylets, scheduling, a second set of agents), not a speed-up from more hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, command_line, markdown_table, result_path, write_result  # noqa: E402

sys.path.insert(0, REPO)
from cluster.local_cluster import LocalCluster  # noqa: E402

OVERRIDES = ["tasks.builtin=[copy,reverse,add,sort]", "upcycle.enabled=false", "experts.optim.steps=300",
             "experts.optim.checkpoint_every=100"]
TINY_OVERRIDES = ["tasks.builtin=[copy,add]", "upcycle.enabled=false", "experts.optim.steps=2"]
STAGES = ("base", "experts", "soft_targets", "student", "multitask", "eval")


def run_once(setting: str, cpus: int, config: str, overrides: list[str], runs_dir: str) -> dict:
    """A fresh cluster for `setting`, one `ray job submit` of the pipeline, the cluster stopped again."""
    per_node = cpus if setting == "one node" else cpus // 2
    with LocalCluster(head_cpus=per_node) as cluster:
        if setting == "two nodes":
            cluster.add_node(num_cpus=per_node)
        node_names = {n.node_id(): n.name for n in cluster.nodes}
        name = "bench-" + setting.replace(" ", "-")
        runtime_env = json.dumps({"excludes": [".venv", "runs", ".git"], "env_vars": {"HF_HUB_OFFLINE": "1"}})
        start = time.time()
        job = cluster.job("submit", "--working-dir", ".", "--runtime-env-json", runtime_env, "--", "python", "-m",
                          "dume_ray", "run", "--config", config, f"name={name}", f"runs_dir={runs_dir}", *overrides,
                          timeout=1800)
        total = time.time() - start
        if job.returncode != 0 or "succeeded" not in job.stdout:
            raise RuntimeError(f"{setting}: the job failed:\n{job.stdout[-4000:]}\n{job.stderr[-2000:]}")
    run_dir = os.path.join(runs_dir, name)
    seconds, experts_on = {}, {}
    finished = re.findall(r"\[experts\] \d+/\d+ finished: .*\((\d+) s since stage start\)", job.stdout)
    seconds["experts stage (wall)"] = float(finished[-1]) if finished else None
    for stage in STAGES:
        if stage == "experts":
            groups = sorted(os.listdir(os.path.join(run_dir, "experts")))
            manifests = {g: json.load(open(os.path.join(run_dir, "experts", g, "DONE.json"))) for g in groups
                         if os.path.exists(os.path.join(run_dir, "experts", g, "DONE.json"))}
            seconds["experts (longest group)"] = max(m["seconds"] for m in manifests.values())
            experts_on = {g: node_names.get(m["metrics"].get("node_id"), "?") for g, m in manifests.items()}
            continue
        path = os.path.join(run_dir, stage, "DONE.json")
        if os.path.exists(path):
            seconds[stage] = json.load(open(path)).get("seconds")
    return {"setting": setting, "nodes": 1 if setting == "one node" else 2, "cpus_per_node": per_node,
            "total_seconds": round(total, 1), "stage_seconds": seconds, "experts_on": experts_on}


def summarize(runs: list[dict], repeats: int, cpus: int) -> str:
    """The markdown table: per row the median over rounds of each setting, and two nodes / one node."""
    def median(setting: str, key) -> float:
        values = [key(r) for r in runs if r["setting"] == setting]
        return statistics.median(values) if values else float("nan")

    rows = []
    for key in ["total (ray job submit)"] + list(runs[0]["stage_seconds"]):
        get = (lambda r: r["total_seconds"]) if key.startswith("total") else (lambda r, k=key: r["stage_seconds"].get(k) or 0.0)
        one, two = median("one node", get), median("two nodes", get)
        rows.append([key, one, two, two / one if one else None])
    spread = {r["setting"]: sorted(set(r["experts_on"].values())) for r in runs}
    rows.append(["nodes the experts ran on", ", ".join(spread["one node"]), ", ".join(spread["two nodes"]), None])
    return markdown_table([f"seconds (median of {repeats})", f"one node ({cpus} CPUs)",
                           f"two nodes ({cpus // 2} + {cpus // 2} CPUs)", "two / one"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/smoke/tiny.yaml")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs in all (even), the same for both settings")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (one node, two nodes)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (replace the built-in ones)")
    args = parser.parse_args()
    overrides = args.overrides or (TINY_OVERRIDES if args.tiny else OVERRIDES)
    if args.cpus < 2 or args.cpus % 2:
        parser.error("--cpus must be even (split over two nodes), at least 2")
    started = time.time()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-two-nodes-") as runs_dir:
        for round_ in range(args.repeats):
            for setting in ("one node", "two nodes"):
                result = run_once(setting, args.cpus, args.config, overrides, os.path.join(runs_dir, str(round_)))
                print(f"[two_nodes] round {round_ + 1}: {setting}: {result['total_seconds']:.0f} s, experts on "
                      f"{result['experts_on']}", flush=True)
                runs.append(result)

    table = summarize(runs, args.repeats, args.cpus)
    print(table)
    write_result(result_path("two_nodes", args.out, args.tiny), "two_nodes", command_line(), started,
                 {"config": args.config, "overrides": overrides, "cpus": args.cpus, "runs": runs}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
