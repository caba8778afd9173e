"""Benchmarks: what lb:NAME costs next to calling the member directly, and fairness under load.

    python bench/run.py            # the full run (a few minutes on 2 cores)
    python bench/run.py --quick    # a few iterations, to check that it works (CI)

Each comparison runs both sides in the same run, alternating them, and reports medians and
their ratio. It prints a table and writes the same as JSON (--json PATH, default
bench/results.json). It works in a temporary LLM_USER_PATH: your own llm directory is never
touched. It reports what it measured; the targets are printed beside the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the in-process steps (3, 3b, 3c) time each side in this many blocks, taken in turns, and what
# lb: adds is the median of the differences between a block and its pair (``comparison``)
BLOCKS = 40
# every limit on each member of lb:limited and lb:cached, never reached
LIMITS = "rpm=1000000000 rpd=1000000000 tpm=1000000000 tpd=1000000000"
# step 3c's system prompts: four of 5 KB, long enough to be a prefix (affinity)
SYSTEMS = [f"System prompt {n}: " + "You are a careful assistant. " * 170 for n in range(4)]
sys.path.insert(0, str(HERE.parent / "tests"))


def llm_command(*args) -> list[str]:
    return [sys.executable, "-m", "llm", *args]


def run_timed(command, env) -> float:
    start = time.perf_counter()
    subprocess.run(
        command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - start


def instructions(command, env) -> int:
    "The CPU instructions a command runs, counted by valgrind's callgrind."
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/out", *command],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    for line in done.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1])
    raise RuntimeError(f"callgrind printed no count: {done.stderr[-300:]}")


def alternate(pairs: int, a, b) -> tuple[list[float], list[float]]:
    "Run a and b alternately (a first in even rounds, b first in odd ones)."
    times_a, times_b = [], []
    for round_ in range(pairs):
        if round_ % 2:
            times_b.append(b())
            times_a.append(a())
        else:
            times_a.append(a())
            times_b.append(b())
    return times_a, times_b


def comparison(name, unit, lb_times, base_times, target, scale=1.0, paired=False) -> dict:
    """Medians of both sides, their ratio, and what lb: adds: the difference of the medians,
    or, ``paired`` (blocks of both sides taken in turns), the median of each pair's difference,
    which the machine's drift from block to block moves far less."""
    lb_median = statistics.median(lb_times) * scale
    base_median = statistics.median(base_times) * scale
    added = lb_median - base_median
    if paired:
        added = statistics.median(a - b for a, b in zip(lb_times, base_times)) * scale
    return {
        "name": name,
        "unit": unit,
        "runs": len(lb_times),
        "lb": round(lb_median, 4),
        "baseline": round(base_median, 4),
        "ratio": round(lb_median / base_median, 4) if base_median else None,
        "added": round(added, 4),
        "target": target,
    }


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.dir = Path(tempfile.mkdtemp(prefix="llm-lb-bench-"))
        self.env = dict(os.environ, LLM_USER_PATH=str(self.dir / "user"))
        self.env.pop("LLM_LOADBALANCER_DEBUG", None)
        # Start-up is compared with the same plugin loading on both sides: llm loads exactly
        # the plugins LLM_LOAD_PLUGINS names, so the difference is this plugin alone (without
        # it, llm scans every installed package's entry points, which costs the same with or
        # without this plugin).
        self.plugin_env = dict(self.env, LLM_LOAD_PLUGINS="llm-echo,llm-loadbalancer")
        self.no_plugin_env = dict(self.env, LLM_LOAD_PLUGINS="llm-echo")
        self.results: list[dict] = []
        self.notes: dict = {}

    def llm(self, *args, env=None):
        subprocess.run(
            llm_command(*args), env=env or self.env, check=True, capture_output=True, text=True
        )

    def setup(self):
        # Measure the plugin as an installed package runs: with its modules compiled (pip
        # compiles them on install; an editable install under PYTHONDONTWRITEBYTECODE=1
        # would compile them again in every process).
        import compileall

        compileall.compile_dir(str(HERE.parent / "llm_loadbalancer"), quiet=1)
        (self.dir / "user").mkdir()
        keys = {f"k{i}": f"value-{i}" for i in range(1, 5)}
        (self.dir / "user" / "keys.json").write_text(json.dumps(keys))
        self.llm("lb", "save", "bench", "echo", "echo")
        self.llm("lb", "save", "four", *[f"echo-needs-key key=k{i}" for i in range(1, 5)])
        self.llm(
            "lb", "save", "weighted", "echo-needs-key key=k1 weight=3", "echo-needs-key key=k2"
        )
        limited = LIMITS
        # (through an alias of echo: a limit belongs to the model and key, and echo with no key
        # is lb:bench's members' too, which these limits would then apply to; a key of their
        # own would measure llm's key look-up as well)
        self.llm("aliases", "set", "echo-limited", "echo")
        self.llm("lb", "save", "limited", f"echo-limited {limited}", f"echo-limited {limited}")
        self.llm("lb", "save", "heavy", "echo", "echo weight=1000000000")
        self.llm(  # (the same limits as lb:limited, and affinity)
            "lb", "save", "cached", *[f"echo-limited {limited}"] * 2, "--affinity", "300"
        )
        # 46 more, so that 50 balancers are saved for the start-up measurements
        folder = self.dir / "user" / "loadbalancers"
        template = (folder / "bench.yaml").read_text()
        for i in range(46):
            (folder / f"extra{i:02d}.yaml").write_text(template)

    # 1 ---------------------------------------------------------------------------------
    def one_shot_cli(self):
        pairs = 3 if self.quick else 21
        lb, base = alternate(
            pairs,
            lambda: run_timed(llm_command("-m", "lb:bench", "hi"), self.env),
            lambda: run_timed(llm_command("-m", "echo", "hi"), self.env),
        )
        self.results.append(
            comparison(
                "1. one-shot CLI: llm -m lb:bench hi vs llm -m echo hi",
                "s",
                lb,
                base,
                "ratio <= 1.02",
            )
        )

    # 1c --------------------------------------------------------------------------------
    def instructions(self):
        """Steps 1 and 2 counted in CPU instructions (valgrind's callgrind), which repeat from
        run to run whatever else the machine does, where whole-process times on a shared
        2-core machine move by several hundredths. One run each; full mode only (a callgrind
        run takes about 30 s). The plugin's modules are compiled, as pip installs them."""
        if self.quick or shutil.which("valgrind") is None:
            print("    (skipped: quick mode, or valgrind is not installed)", file=sys.stderr)
            return
        for name, target, lb_args, lb_env, base_args, base_env in (
            (
                "1c. instructions: llm -m lb:bench --no-log hi vs llm -m echo --no-log hi",
                "ratio <= 1.02",
                ("-m", "lb:bench", "--no-log", "hi"),
                self.plugin_env,
                ("-m", "echo", "--no-log", "hi"),
                self.plugin_env,  # as in step 1: what lb:NAME costs over its member
            ),
            (
                "1c. instructions: llm models, plugin + 50 balancers vs no plugin",
                "ratio <= 1.05",
                ("models",),
                self.plugin_env,
                ("models",),
                self.no_plugin_env,
            ),
        ):
            counts = []
            for args, env in ((lb_args, lb_env), (base_args, base_env)):
                self.llm(*args, env=env)  # once first: the state file exists, as it does later
                counts.append(instructions(llm_command(*args), env) / 1e6)
            self.results.append(
                comparison(name, "M instr", [counts[0]], [counts[1]], target)
            )

    # 2 ---------------------------------------------------------------------------------
    def startup(self):
        pairs = 3 if self.quick else 21
        for args, target in ((("--version",), "ratio <= 1.02"), (("models",), "ratio <= 1.05")):
            lb, base = alternate(
                pairs,
                lambda: run_timed(llm_command(*args), self.plugin_env),
                lambda: run_timed(llm_command(*args), self.no_plugin_env),
            )
            self.results.append(
                comparison(
                    f"2. start-up: llm {' '.join(args)}, plugin + 50 balancers vs no plugin",
                    "s",
                    lb,
                    base,
                    target,
                )
            )

    # 2b --------------------------------------------------------------------------------
    def hostile_files(self):
        """The same 50 balancers, with and without hostile files beside them: an alias bomb, a
        20 MB file, one just under the size limit with 100 members and long values, a file
        that is not UTF-8 and one with duplicate keys. Their cost is what every llm command
        that looks up a model pays."""
        hostile = self.dir / "hostile"
        shutil.copytree(self.dir / "user", hostile)
        folder = hostile / "loadbalancers"
        sys.path.insert(0, str(HERE.parent / "tests"))
        from test_hostile import BILLION_LAUGHS

        (folder / "bomb.yaml").write_text(BILLION_LAUGHS)
        (folder / "huge.yaml").write_text("members:\n" + "  - echo\n" * 2_500_000)
        member = "  - {model: echo, options: {example_bool: true}, key: %s}\n"
        text = "members:\n" + "".join(member % ("k" * 560) for _ in range(100))
        (folder / "full.yaml").write_text(text)
        (folder / "binary.yaml").write_bytes(b"members: [\xff\xfe]\n")
        (folder / "dup.yaml").write_text("members: [echo]\nmembers: [echo]\n")
        hostile_env = dict(self.env, LLM_USER_PATH=str(hostile))
        pairs = 3 if self.quick else 21
        for args in (("models",), ("-m", "echo", "hi")):
            with_files, without = alternate(
                pairs,
                lambda: run_timed(llm_command(*args), hostile_env),
                lambda: run_timed(llm_command(*args), self.env),
            )
            self.results.append(
                comparison(
                    f"2b. llm {' '.join(args)}: 50 balancers + 5 hostile files vs without",
                    "s",
                    with_files,
                    without,
                    "added <= 0.005 s",
                )
            )

    # 3 ---------------------------------------------------------------------------------
    def in_process(self):
        # lb:limited has every limit set on both members (never reached) and each prompt is
        # the first of a conversation (as every CLI prompt is): the most work a prompt does
        for label, balancer, conversation in (
            ("lb:bench vs echo", "bench", False),
            ("lb:limited vs echo, limits on, in a conversation", "limited", True),
        ):
            self._in_process_row("3", label, balancer, "added <= 150 us", conversation)

    # 3b --------------------------------------------------------------------------------
    def heavy_weights(self):
        """Weights 1 and 1,000,000,000 against 1 and 1 (lb:bench): the weighted cycle is never
        built, so a prompt costs about the same whatever the weights (issue 20)."""
        self._in_process_row(
            "3b", "weights 1, 10**9 vs 1, 1", "heavy", "added <= 25 us", baseline="lb:bench"
        )

    # 3c --------------------------------------------------------------------------------
    def affinity(self):
        """Prompt-cache affinity (issue 21): the cost per prompt with limits and affinity on,
        four 5 KB system prompts in turn with a short prompt after each (in a conversation, as
        the CLI sends them); and the share of long-prefix prompts that reach the member that
        last served their prefix (where its cache is warm), with and without affinity: 400
        choices over 4 members through the state file, a second apart, in a random order."""
        prompts = 200 if self.quick else 4000
        ask = (  # four 5 KB system prompts in turn, each followed by a short prompt
            "system = SYSTEMS[(i // 2) % 4] if i % 2 == 0 else None\n"
            'model.conversation().prompt("hi", system=system).text()'
        )
        times = self._in_process_times("cached", prompts, ask, warm=40)
        self.results.append(
            comparison(
                f"3c. in-process, {prompts} prompts: lb:cached vs echo, limits and affinity on, "
                "half with a 5 KB system prompt, per prompt",
                "us",
                times["lb"],
                times["echo"],
                "added <= 150 us",
                scale=1e6,
                paired=True,
            )
        )
        shares = {}
        for seconds in (300, 0):
            shares[seconds] = self._warm_share(seconds)
        self.notes["3c. long-prefix prompts reaching a warm member"] = (
            f"with affinity {shares[300]:.0%}, without {shares[0]:.0%} (4 members, 4 prefixes, "
            "400 choices, half of them long-prefix)"
        )

    def _warm_share(self, seconds: float) -> float:
        "The share of long-prefix prompts chosen for the member that last served their prefix."
        script = textwrap.dedent(
            f"""
            import dataclasses, random, tempfile
            from llm_loadbalancer import config, store
            from llm_loadbalancer.store import Outcome
            data = {{"members": [{{"model": "echo"}}] * 4, "affinity": {seconds}}}
            balancer = dataclasses.replace(
                config.from_dict("warm", data), user_dir=tempfile.mkdtemp()
            )
            st = store.open_store(balancer)
            draw = random.Random(21)
            last, warm, long = {{}}, 0, 0
            for step in range(400):
                prefix = draw.choice(["a", "b", "c", "d", None, None, None, None])
                choice = st.choose(balancer, now=1e9 + step, prefix=prefix)
                member = choice.plan.order[0]
                st.record(balancer, member, Outcome(prefix=prefix), now=1e9 + step)
                if prefix:
                    if prefix in last:
                        long += 1
                        warm += last[prefix] == member
                    last[prefix] = member
            print(warm / long)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], env=self.env, check=True, capture_output=True, text=True
        ).stdout
        return float(out)

    def _in_process_row(self, step, label, balancer, target, conversation=False, baseline="echo"):
        "One row: prompts through lb:BALANCER against ``baseline`` in one process, per prompt."
        prompts = 200 if self.quick else 5000
        ask = f'model.{"conversation()." if conversation else ""}prompt("hi").text()'
        times = self._in_process_times(balancer, prompts, ask, baseline=baseline)
        self.results.append(
            comparison(
                f"{step}. in-process, {prompts} prompts: {label}, per prompt",
                "us",
                times["lb"],
                times["echo"],
                target,
                scale=1e6,
                paired=True,
            )
        )

    def _in_process_times(
        self, balancer: str, prompts: int, ask: str, baseline: str = "echo", warm: int = 20
    ) -> dict:
        """Seconds per prompt through lb:BALANCER and through ``baseline``, in one process:
        BLOCKS blocks of each, taking turns (which side goes first alternates). ``ask``: the
        code of one prompt to ``model``, the i-th (SYSTEMS at hand)."""
        script = textwrap.dedent(
            f"""
            import json, sys, time, llm
            sys.path.insert(0, {str(HERE)!r})
            from run import SYSTEMS
            lb = llm.get_model("lb:{balancer}")
            echo = llm.get_model("{baseline}")
            def ask(model, i):
                ASK
            for model in (lb, echo):  # warm up: imports, state file, caches
                for i in range({warm}):
                    ask(model, i)
            blocks = {BLOCKS}
            per_block = {prompts} // blocks
            times = {{"lb": [], "echo": []}}
            for block in range(blocks):
                order = (("lb", lb), ("echo", echo)) if block % 2 == 0 else (("echo", echo), ("lb", lb))
                for name, model in order:
                    start = time.perf_counter()
                    for i in range(per_block):
                        ask(model, i)
                    times[name].append((time.perf_counter() - start) / per_block)
            print(json.dumps(times))
            """
        ).replace("    ASK", textwrap.indent(ask, "    "))
        out = subprocess.run(
            [sys.executable, "-c", script], env=self.env, check=True, capture_output=True, text=True
        ).stdout
        return json.loads(out)

    # 4 ---------------------------------------------------------------------------------
    def concurrency(self):
        self._concurrency("four", "4. concurrency: {} processes x {} prompts, 4 members", 4)

    def weighted(self):
        self._concurrency("weighted", "4b. weights 3, 1: {} processes x {} prompts", 2)

    def _concurrency(self, balancer: str, title: str, members: int, envs=None):
        processes, prompts = (8, 20) if self.quick else (8, 200)
        envs = envs or [self.env]
        self.llm("lb", "reset", balancer)
        weights = [3, 1] if balancer.startswith("weighted") else [1] * members
        # Every worker imports llm first, then all start prompting at the same moment, so
        # that the selections really overlap and process start-up is not counted.
        start_at = time.time() + (4 if self.quick else 6)
        script = textwrap.dedent(
            f"""
            import collections, json, time, llm
            model = llm.get_model("lb:{balancer}")
            time.sleep(max(0.0, {start_at} - time.time()))
            counts = collections.Counter(
                json.loads(model.prompt("hi").text())["key"] for _ in range({prompts})
            )
            print(json.dumps({{"counts": counts, "end": time.time()}}))
            """
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script],
                env=envs[number % len(envs)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for number in range(processes)
        ]
        totals: dict = {}
        ends = []
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit("a concurrency worker failed")
            data = json.loads(out)
            ends.append(data["end"])
            for key, count in data["counts"].items():
                totals[key] = totals.get(key, 0) + count
        elapsed = max(ends) - start_at
        expected = [processes * prompts * weight // sum(weights) for weight in weights]
        per_member = {key.replace("value-", "member "): totals[key] for key in sorted(totals)}
        self.results.append(
            {
                "name": title.format(processes, prompts),
                "unit": "prompts/s",
                "runs": processes * prompts,
                "lb": round(processes * prompts / elapsed, 1),
                "baseline": None,
                "ratio": None,
                "added": None,
                "target": f"exactly {', '.join(map(str, expected))} per member",
                "per_member": per_member,
                "exact": [totals.get(f"value-{i}") for i in range(1, members + 1)] == expected,
            }
        )

    def run(self, only=None):
        self.setup()
        steps = [
            self.one_shot_cli,
            self.instructions,
            self.startup,
            self.hostile_files,
            self.in_process,
            self.heavy_weights,
            self.affinity,
            self.concurrency,
            self.weighted,
        ]
        steps += self.http_steps()
        steps.append(self.redis)
        for step in steps:
            if only and step.__name__ not in only:
                continue
            print(f"... {step.__name__}", file=sys.stderr, flush=True)
            step()

    # 9 ---------------------------------------------------------------------------------
    def redis(self):
        """The same balancers with their state in a local redis-server: the added time per
        prompt against the SQLite file, and the weighted rotation's exactness with two llm
        user folders ("machines") sharing the server."""
        if shutil.which("redis-server") is None:
            print("    (skipped: redis-server is not installed)", file=sys.stderr)
            return
        port = free_port()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            for line in server.stdout:
                if "Ready to accept connections" in line:
                    break
            url = f"redis://127.0.0.1:{port}/0"
            self.llm("lb", "save", "bench-redis", "echo", "echo", "--state", url)
            self._in_process_row(
                "9",
                "Redis state vs SQLite file",
                "bench-redis",
                "added < 1000 us",
                baseline="lb:bench",
            )
            machine_b = self.dir / "machine-b"
            (machine_b / "loadbalancers").mkdir(parents=True, exist_ok=True)
            shutil.copy(self.dir / "user" / "keys.json", machine_b / "keys.json")
            self.llm(
                "lb",
                "save",
                "weighted-redis",
                "echo-needs-key key=k1 weight=3",
                "echo-needs-key key=k2",
                "--state",
                url,
            )
            shutil.copy(
                self.dir / "user" / "loadbalancers" / "weighted-redis.yaml",
                machine_b / "loadbalancers" / "weighted-redis.yaml",
            )
            self._concurrency(
                "weighted-redis",
                "9b. Redis, 2 machines, weights 3, 1: {} processes x {} prompts",
                2,
                envs=[self.env, dict(self.env, LLM_USER_PATH=str(machine_b))],
            )
        finally:
            server.terminate()
            server.wait()

    def http_steps(self):
        return [self.http, self.policies]

    # 8 ---------------------------------------------------------------------------------
    def policies(self):
        """Members of different speeds (the local server answers key sk-50 after 50 ms, sk-200
        after 200 ms, sk-800 after 800 ms), 8 processes prompting at once: prompts per second
        and median time to first chunk for roundrobin, least-busy and lowest-latency."""
        port = free_port()
        delays = {"sk-50": 0.05, "sk-200": 0.2, "sk-800": 0.8}
        server = subprocess.Popen(
            [sys.executable, str(HERE.parent / "tests" / "local_openai.py"), "--port", str(port)]
            + [arg for key, delay in delays.items() for arg in ("--slow", f"{key}={delay}")],
            stdout=subprocess.PIPE,
            text=True,
        )
        user = self.dir / "policies"
        user.mkdir(exist_ok=True)
        env = dict(self.env, LLM_USER_PATH=str(user), LLM_LOAD_PLUGINS="llm-loadbalancer")
        import yaml

        (user / "extra-openai-models.yaml").write_text(
            yaml.safe_dump(
                [
                    {
                        "model_id": "local",
                        "model_name": "gpt-local",
                        "api_base": f"http://127.0.0.1:{port}/a/v1",
                        "api_key_name": "sk-50",
                    }
                ]
            )
        )
        (user / "keys.json").write_text(json.dumps({key: key for key in delays}))
        processes, prompts = (8, 3) if self.quick else (8, 15)
        try:
            server.stdout.readline()  # "serving on ..."
            for policy in ("roundrobin", "least-busy", "lowest-latency"):
                subprocess.run(
                    llm_command(
                        "lb",
                        "save",
                        policy,
                        *[f"local key={key}" for key in delays],
                        "--policy",
                        policy,
                        "--force",
                    ),
                    env=env,
                    check=True,
                    capture_output=True,
                )
                self.results.append(self._policy_run(policy, env, processes, prompts))
        finally:
            server.terminate()
            server.wait()

    def _policy_run(self, policy: str, env: dict, processes: int, prompts: int) -> dict:
        start_at = time.time() + (4 if self.quick else 6)
        script = textwrap.dedent(
            f"""
            import json, time, llm
            model = llm.get_model("lb:{policy}")
            time.sleep(max(0.0, {start_at} - time.time()))
            firsts = []
            for _ in range({prompts}):
                start = time.perf_counter()
                first = None
                for chunk in model.prompt("hi"):  # the whole answer, as llm shows it
                    first = first or time.perf_counter() - start
                firsts.append(first)
            print(json.dumps({{"firsts": firsts, "end": time.time(), "cpu": time.process_time()}}))
            """
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
            )
            for _ in range(processes)
        ]
        firsts, ends, cpu = [], [], 0.0
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"a {policy} worker failed")
            data = json.loads(out)
            firsts += data["firsts"]
            ends.append(data["end"])
            cpu += data["cpu"]
        median = statistics.median(firsts) * 1000
        return {
            "name": f"8. {policy}, members at 50/200/800 ms: median first chunk {median:.0f} ms, "
            f"CPU {cpu / len(firsts) * 1000:.0f} ms/prompt",
            "unit": "prompts/s",
            "runs": len(firsts),
            "lb": round(len(firsts) / (max(ends) - start_at), 1),
            "baseline": None,
            "median_first_chunk_ms": round(median, 1),
            # CPU time of the 8 processes (start-up included) per prompt: on 2 cores this
            # bounds prompts/s whatever the members' speed
            "cpu_ms_per_prompt": round(cpu / len(firsts) * 1000, 1),
            "ratio": None,
            "added": None,
            "target": "least-busy, lowest-latency ahead",
        }

    # 5, 6 ------------------------------------------------------------------------------
    def http(self):
        """Through llm's OpenAI plugin and llm-anthropic to local servers speaking their APIs,
        each run as its own process on 127.0.0.1, with the SDKs' retries left as they are."""
        port, anthropic_port = free_port(), free_port()
        servers = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(HERE.parent / "tests" / script),
                    "--port",
                    str(server_port),
                    "--chunk-delay",
                    "0.02",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for script, server_port in (
                ("local_openai.py", port),
                ("local_anthropic.py", anthropic_port),
            )
        ]
        env = dict(self.env, ANTHROPIC_BASE_URL=f"http://127.0.0.1:{anthropic_port}/anthropic")
        try:
            for server in servers:
                server.stdout.readline()  # "serving on ..."
            out = subprocess.run(
                [sys.executable, __file__, "--http-worker", str(port)]
                + (["--quick"] if self.quick else []),
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        finally:
            for server in servers:
                server.terminate()
                server.wait()
        data = json.loads(out)
        self.results.append(
            comparison(
                "5. streaming, time to first chunk: lb:http vs local-a",
                "ms",
                data["ttfb_lb"],
                data["ttfb_direct"],
                "added <= 5 ms",
                scale=1000,
            )
        )
        self.results.append(
            {
                "name": "6. HTTP, sequential prompts: lb:http (two keys) vs local-a",
                "unit": "prompts/s",
                "runs": data["rps_prompts"],
                "lb": round(data["rps_lb"], 1),
                "baseline": round(data["rps_direct"], 1),
                "ratio": round(data["rps_lb"] / data["rps_direct"], 4),
                "added": None,
                "target": "-",
            }
        )
        for case, label in (
            ("429", "429, no Retry-After"),
            ("429:1", "429, Retry-After: 1"),
            ("refused", "connection refused"),
        ):
            self.results.append(
                comparison(
                    f"6. failover when the first member fails ({label}) vs a normal prompt",
                    "s",
                    data["failover"][case],
                    data["failover_base"],
                    "measured, see docs/failures-and-timeouts.md",
                )
            )
        for case, label in (("429", "429, no Retry-After"), ("429:1", "429, Retry-After: 1")):
            self.results.append(
                comparison(
                    f"6. for reference, llm alone: the SDK's retries, then the error ({label})",
                    "s",
                    data["sdk_alone"][case],
                    data["failover_base"],
                    "measured, see docs/failures-and-timeouts.md",
                )
            )
        for case, label in (
            ("429", "429, no Retry-After"),
            ("429:20", "429, Retry-After: 20"),
            ("refused", "connection refused"),
        ):
            self.results.append(
                comparison(
                    f"7. failover through llm-anthropic vs through llm's OpenAI plugin ({label})",
                    "s",
                    data["anthropic_failover"][case],
                    data["openai_failover"][case],
                    "added <= 0.1 s",
                )
            )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_worker(port: int, quick: bool) -> None:
    "Runs in its own process with the bench's LLM_USER_PATH; prints JSON."
    import llm
    import yaml

    from llm_loadbalancer import config, store

    user = llm.user_dir()
    base = f"http://127.0.0.1:{port}"
    models = [
        {
            "model_id": "local-a",
            "model_name": "gpt-local",
            "api_base": f"{base}/a/v1",
            "api_key_name": "local-a",
        },
        {
            "model_id": "local-dead",
            "model_name": "gpt-local",
            "api_base": f"http://127.0.0.1:{free_port()}/v1",
            "api_key_name": "local-a",
        },
    ]
    (user / "extra-openai-models.yaml").write_text(yaml.safe_dump(models))
    keys = json.loads((user / "keys.json").read_text())
    keys.update({"local-a": "sk-a", "one": "sk-one", "two": "sk-two"})
    keys.update({f"f{name}": f"fail-{name}" for name in ("429", "429:1", "429:20")})
    (user / "keys.json").write_text(json.dumps(keys))

    def save(name, *specs):
        members = [config.parse_member_spec(spec) for spec in specs]
        config.write(config.Balancer(name=name, members=tuple(members)))

    save("http", "local-a key=one", "local-a key=two")
    for case, first in (
        ("429", "local-a key=f429"),
        ("429:1", "local-a key=f429:1"),
        ("refused", "local-dead"),
    ):
        save(f"fo{case.replace(':', '-')}", first, "local-a key=one")
    # 7: the same failover with the failing member from llm-anthropic, and from llm's OpenAI
    # plugin; "refused" is an endpoint where nothing listens
    for case in ("429", "429:20"):
        save(f"ant{case.replace(':', '-')}", f"claude-haiku-4.5 key=f{case}", "local-a key=one")
        save(f"oai{case.replace(':', '-')}", f"local-a key=f{case}", "local-a key=one")
    save("antrefused", "claude-haiku-4.5 key=one", "local-a key=one")
    save("oairefused", "local-dead", "local-a key=one")
    lb, direct = llm.get_model("lb:http"), llm.get_model("local-a")

    def first_chunk(model):
        start = time.perf_counter()
        first = None
        for _ in model.prompt("hi"):
            if first is None:
                first = time.perf_counter() - start
        return first

    def whole(model, **kwargs):
        start = time.perf_counter()
        model.prompt("hi", **kwargs).text()
        return time.perf_counter() - start

    first_chunk(lb), first_chunk(direct)  # warm up
    rounds = 5 if quick else 41
    ttfb_lb, ttfb_direct = alternate(rounds, lambda: first_chunk(lb), lambda: first_chunk(direct))
    prompts = 10 if quick else 400
    timings = {"lb": 0.0, "direct": 0.0}
    for block in range(10):
        for name, model in (
            (("lb", lb), ("direct", direct)) if block % 2 == 0 else (("direct", direct), ("lb", lb))
        ):
            start = time.perf_counter()
            for _ in range(prompts // 10):
                model.prompt("hi", stream=False).text()
            timings[name] += time.perf_counter() - start
    failover, failover_base = {}, []
    for case in ("429", "429:1", "refused"):
        name = f"fo{case.replace(':', '-')}"
        model = llm.get_model(f"lb:{name}")
        failover[case] = []
        for _ in range(2 if quick else 5):
            store.reset(config.load(name))  # no cooldown: the first member is asked each time
            failover[case].append(whole(model, stream=False))
            failover_base.append(whole(direct, stream=False, key="one"))
    plugin_failover = {"anthropic": {}, "openai": {}}
    for case in ("429", "429:20", "refused"):
        for plugin, prefix in (("anthropic", "ant"), ("openai", "oai")):
            plugin_failover[plugin][case] = []
        for _ in range(2 if quick else 7):
            for plugin, prefix in (("anthropic", "ant"), ("openai", "oai")):
                name = f"{prefix}{case.replace(':', '-')}"
                store.reset(config.load(name))
                environ = os.environ.copy()
                if case == "refused" and plugin == "anthropic":
                    os.environ["ANTHROPIC_BASE_URL"] = f"http://127.0.0.1:{free_port()}"
                try:
                    model = llm.get_model(f"lb:{name}")
                    plugin_failover[plugin][case].append(whole(model, stream=False))
                finally:
                    os.environ.clear()
                    os.environ.update(environ)
    # What llm does alone when a member fails: the openai SDK's own retries, then the error.
    sdk_alone = {}
    for case in ("429", "429:1"):
        failing = llm.get_model("local-a")
        sdk_alone[case] = []
        for _ in range(1 if quick else 3):
            start = time.perf_counter()
            try:
                failing.prompt("hi", stream=False, key=f"f{case}").text()
            except Exception:
                pass
            sdk_alone[case].append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "ttfb_lb": ttfb_lb,
                "ttfb_direct": ttfb_direct,
                "rps_prompts": prompts,
                "rps_lb": prompts / timings["lb"],
                "rps_direct": prompts / timings["direct"],
                "failover": failover,
                "failover_base": failover_base,
                "sdk_alone": sdk_alone,
                "anthropic_failover": plugin_failover["anthropic"],
                "openai_failover": plugin_failover["openai"],
            }
        )
    )


def render(results: list[dict]) -> str:
    lines = [
        f"{'measurement':<72} {'unit':>9} {'lb:':>10} {'direct':>10} {'ratio':>7} {'added':>9}  target",
    ]
    for r in results:

        def fmt(value, spec="{:.4g}"):
            return "-" if value is None else spec.format(value)

        lines.append(
            f"{r['name']:<72} {r['unit']:>9} {fmt(r['lb']):>10} {fmt(r['baseline']):>10} "
            f"{fmt(r['ratio'], '{:.3f}'):>7} {fmt(r['added']):>9}  {r['target']}"
        )
        if "per_member" in r:
            counts = ", ".join(f"{k}: {v}" for k, v in r["per_member"].items())
            lines.append(f"{'':<6}per member: {counts} ({'exact' if r['exact'] else 'NOT EXACT'})")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few iterations only")
    parser.add_argument(
        "--json", default=str(HERE / "results.json"), help="where to write the JSON"
    )
    parser.add_argument("--only", nargs="*", help="run only these steps (method names)")
    parser.add_argument("--http-worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.http_worker:
        http_worker(args.http_worker, args.quick)
        return
    bench = Bench(args.quick)
    started = datetime.datetime.now(datetime.timezone.utc)
    bench.run(args.only)
    report = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "quick": args.quick,
        "results": bench.results,
        **bench.notes,
    }
    print(render(bench.results))
    for name, note in bench.notes.items():
        print(f"{name}: {note}")
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['date']}, {report['machine']}; JSON written to {args.json}")


if __name__ == "__main__":
    main()
