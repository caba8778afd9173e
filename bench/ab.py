"""Two versions of the plugin, compared prompt for prompt in one process (for work on its cost).

    python bench/ab.py OLD NEW                   # lb:limited, in a conversation (step 3's row)
    python bench/ab.py OLD NEW --balancer bench  # lb:bench, or lb:cached (step 3c's prompts)
    python bench/ab.py OLD NEW --store           # the state alone: a choice and its outcome

OLD and NEW are checkouts (a folder with ``llm_loadbalancer/``, e.g. from ``git worktree add
/tmp/old HEAD~1``). Each is imported under a name of its own, with an llm folder of its own
holding the same balancers as bench/run.py's, and the two (and llm-echo alone) take turns in a
random order, in blocks of prompts. On a shared machine a block's time moves with the machine
more than with the code; the difference between the two versions in the same round moves much
less, so the figure to read is the paired difference (NEW - OLD), whose median and quartiles
are printed last. (bench/run.py's step 3 compares one version with llm-echo alone.)
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import LIMITS, SYSTEMS  # (bench/run.py's balancers and step 3c's system prompts)


def llm_folder(path: Path) -> None:
    "An llm folder with bench/run.py's balancers lb:bench, lb:limited and lb:cached."
    path.mkdir(parents=True)
    env = dict(os.environ, LLM_USER_PATH=str(path))
    for args in (
        ("aliases", "set", "echo-limited", "echo"),
        ("lb", "save", "bench", "echo", "echo"),
        ("lb", "save", "limited", f"echo-limited {LIMITS}", f"echo-limited {LIMITS}"),
        ("lb", "save", "cached", *[f"echo-limited {LIMITS}"] * 2, "--affinity", "300"),
    ):
        subprocess.run([sys.executable, "-m", "llm", *args], env=env, check=True,
                       capture_output=True)


def version(label: str, checkout: Path, work: Path):
    "The plugin of a checkout, imported as ``lb_<label>``, and its llm folder."
    package = work / label / f"lb_{label}"
    shutil.copytree(checkout / "llm_loadbalancer", package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(package.parent))
    folder = work / f"user_{label}"
    llm_folder(folder)
    return importlib.import_module(f"lb_{label}"), folder


def prompts(label: str, name: str, store_only: bool, cached: bool):
    "One prompt (or one choice and its outcome) of version ``label``, as a function."
    import llm

    module = f"lb_{label}"
    balancer = importlib.import_module(f"{module}.config").load(name)
    if store_only:
        store = importlib.import_module(f"{module}.store")
        estimates = importlib.import_module(f"{module}.estimates")
        state = store.open_store(balancer)
        prompt = llm.get_model("echo").conversation().prompt("hi").prompt
        outcome = store.Outcome(tokens_in=3, tokens_out=20, first_chunk=0.001, total=0.002,
                                cooled=False)

        def one(i):
            choice = state.choose(balancer, demand=estimates.Demand(prompt, lambda m: None))
            state.record(balancer, choice.plan.order[0], outcome, ticket=choice.ticket)

        return one
    registration = importlib.import_module(f"{module}.registration")
    models = []
    registration.register_balancers(lambda m, *a, **k: models.append(m),
                                    llm.get_models_with_aliases())
    return asking(next(m for m in models if m.model_id == f"lb:{name}"), cached)


def asking(model, cached: bool):
    "A prompt to the model in a conversation of its own (step 3c's, with ``cached``)."

    def one(i):
        system = SYSTEMS[(i // 2) % 4] if cached and i % 2 == 0 else None
        model.conversation().prompt("hi", system=system).text()

    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--balancer", default="limited", choices=["bench", "limited", "cached"])
    parser.add_argument("--store", action="store_true", help="the state alone, no prompt")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=150, help="prompts in a block")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folders = {}
        for label, checkout in (("old", args.old), ("new", args.new)):
            folders[label] = version(label, checkout.resolve(), work)[1]
        import llm

        cached = args.balancer == "cached"
        turns = {}
        for label in ("old", "new"):
            os.environ["LLM_USER_PATH"] = str(folders[label])
            turns[label] = prompts(label, args.balancer, args.store, cached)
        if not args.store:
            turns["echo"] = asking(llm.get_model("echo"), cached)
        times: dict[str, list[float]] = {label: [] for label in turns}
        for label, one in turns.items():  # warm up
            os.environ["LLM_USER_PATH"] = str(folders.get(label, folders["old"]))
            for i in range(300):
                one(i)
        for _ in range(args.rounds):
            order = list(turns)
            random.shuffle(order)
            for label in order:
                os.environ["LLM_USER_PATH"] = str(folders.get(label, folders["old"]))
                one = turns[label]
                start = time.perf_counter()
                for i in range(args.block):
                    one(i)
                times[label].append((time.perf_counter() - start) / args.block * 1e6)
    what = "the state alone" if args.store else f"lb:{args.balancer}, a prompt"
    print(f"{what}: us per prompt, {args.rounds} rounds of {args.block}")
    for label, values in times.items():
        print(f"  {label:4s}  {quartiles(values)}")
    if not args.store:
        for label in ("old", "new"):
            added = [a - b for a, b in zip(times[label], times["echo"])]
            print(f"  {label} less echo alone, in the same round: {quartiles(added)}")
    paired = [new - old for old, new in zip(times["old"], times["new"])]
    print(f"  new - old, in the same round: {quartiles(paired)}")


def quartiles(values: list[float]) -> str:
    ordered = sorted(values)
    quarter = len(ordered) // 4
    return (
        f"median {statistics.median(ordered):7.1f}  (quartiles {ordered[quarter]:.1f} to "
        f"{ordered[-1 - quarter]:.1f})"
    )


if __name__ == "__main__":
    main()
