"""`lookback leakcheck`: finds the future leaking into the past in any
attention implementation.

The implementations under test are small NumPy programs in leak_programs/,
each with a known rule of which keys a row reads (right, or wrong in a known
way), run with Debian's /usr/bin/python3 (which has NumPy). The expected
leaks are written out from that rule and DESIGN.md section 2, so these tests
check the tool against the contract, not against itself.
"""

import functools
import glob
import json
import os
import shlex
import signal
import subprocess
import time
import unittest
import xml.etree.ElementTree as ElementTree

import clitest
from clitest import binary, run

PROGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "leak_programs")
# Debian's interpreter, with python3-numpy; the python3 on PATH may lack NumPy.
PYTHON = "/usr/bin/python3"
SVG_NS = "{http://www.w3.org/2000/svg}"
LEAK_RED = "#d62728"

# Small sizes: every check is len + 2 runs of a Python program (~0.1 s each).
LEN = 8
SHAPE = ("--len", LEN, "--heads", 2, "--kv-heads", 1, "--dim", 8)
SIZES = (*SHAPE, "--jobs", 2)


def command(program):
    """The --exec command that runs leak_programs/PROGRAM.py."""
    return (f"{shlex.quote(PYTHON)} {shlex.quote(os.path.join(PROGRAMS, program + '.py'))} "
            "{q} {k} {v} {out}")


@functools.lru_cache(maxsize=None)
def leakcheck(program, *args):
    """`lookback leakcheck --exec PROGRAM ARGS...`, run once per distinct call
    (the runs are deterministic, and several tests read the same report)."""
    return run("leakcheck", "--exec", command(program), *args)


def pairs(json_pairs):
    return sorted(tuple(pair) for pair in json_pairs)


def causal_pairs(n, window=None, sinks=0):
    """Every (i, j) a bottom-right causal mask lets row i see, for len n
    (with a window, also the sink tokens j < sinks)."""
    return [(i, j) for i in range(n) for j in range(n)
            if j <= i and (window is None or j >= i - window or j < sinks)]


def requires_numpy_python():
    if not os.access(PYTHON, os.X_OK):
        raise unittest.SkipTest(f"{PYTHON} is not installed")


class LeakcheckBlackBox(clitest.CliTestCase):
    def setUp(self):
        super().setUp()
        requires_numpy_python()

    def report(self, program, *args, exit_code):
        """The json report of a check, after checking its exit code and a
        quiet stderr."""
        result = leakcheck(program, *SIZES, *args, "--format", "json")
        self.assertEqual(result.returncode, exit_code,
                         f"exit {result.returncode}, stderr: {result.stderr!r}")
        self.assertEqual(result.stderr, "")
        return json.loads(result.stdout)

    def test_causal_attention_has_no_leak(self):
        report = self.report("causal", exit_code=clitest.EXIT_OK)
        self.assertEqual(report["len"], LEN)
        self.assertEqual(report["verdict"], "causal")
        self.assertEqual(report["leaks"], [])
        self.assertEqual(report["missing"], [])
        # Each row depends on exactly the positions 0..i, all of them seen.
        self.assertEqual(report["dependency"],
                         [[1 if j <= i else 0 for j in range(LEN)] for i in range(LEN)])

    def test_json_keys_come_in_the_documented_order(self):
        report = self.report("causal", exit_code=clitest.EXIT_OK)
        self.assertEqual(list(report)[:5], ["len", "verdict", "leaks", "missing", "dependency"])
        self.assertEqual(report["runs"], LEN + 2)

    def test_missing_mask_leaks_every_future_position(self):
        report = self.report("no_mask", exit_code=clitest.EXIT_FAILURE)
        self.assertEqual(report["verdict"], "leak")
        self.assertEqual(pairs(report["leaks"]),
                         [(i, j) for i in range(LEN) for j in range(LEN) if j > i])
        self.assertEqual(report["missing"], [])

    def test_off_by_one_leaks_exactly_the_next_position(self):
        report = self.report("off_by_one", exit_code=clitest.EXIT_FAILURE)
        self.assertEqual(pairs(report["leaks"]), [(i, i + 1) for i in range(LEN - 1)])

    def test_leak_in_one_head_of_one_batch_element_is_found(self):
        # The program leaks (2, 5) only in the last head of the last batch element.
        report = self.report("one_head_leak", "--batch", 2, exit_code=clitest.EXIT_FAILURE)
        self.assertEqual(pairs(report["leaks"]), [(2, 5)])

    def test_per_head_reports_which_head_leaks(self):
        report = self.report("one_head_leak", "--batch", 2, "--per-head",
                             exit_code=clitest.EXIT_FAILURE)
        heads = report["per_head"]
        self.assertEqual([head["head"] for head in heads], [0, 1])
        self.assertEqual(heads[0]["verdict"], "causal")
        self.assertEqual(heads[0]["leaks"], [])
        self.assertEqual(heads[1]["verdict"], "leak")
        self.assertEqual(pairs(heads[1]["leaks"]), [(2, 5)])

    def test_jobs_do_not_change_the_report(self):
        one = leakcheck("one_head_leak", *SHAPE, "--batch", 2, "--jobs", 1, "--format", "json")
        two = leakcheck("one_head_leak", *SIZES, "--batch", 2, "--format", "json")
        self.assertEqual(one.returncode, clitest.EXIT_FAILURE)
        self.assertEqual(one.stdout, two.stdout)

    def test_window_is_part_of_the_mask(self):
        # A plain causal program checked against a window of 2 reads too far
        # back: every visible-without-window position before i - 2 is a leak.
        report = self.report("causal", "--window", 2, exit_code=clitest.EXIT_FAILURE)
        self.assertEqual(pairs(report["leaks"]),
                         sorted(set(causal_pairs(LEN)) - set(causal_pairs(LEN, window=2))))
        self.assertEqual(report["window"], 2)

    def test_sink_tokens_are_part_of_the_mask(self):
        # window_sinks reads i-2..i and the sinks 0, 1: causal with them.
        report = self.report("window_sinks", "--window", 2, "--sink-tokens", 2,
                             exit_code=clitest.EXIT_OK)
        self.assertEqual(report["verdict"], "causal")
        self.assertEqual(report["missing"], [])
        self.assertEqual((report["window"], report["sink_tokens"]), (2, 2))
        self.assertEqual(pairs([[i, j] for i, row in enumerate(report["dependency"])
                                for j, seen in enumerate(row) if seen]),
                         causal_pairs(LEN, window=2, sinks=2))
        # Without --sink-tokens, the reads of the sink columns are leaks.
        report = self.report("window_sinks", "--window", 2, exit_code=clitest.EXIT_FAILURE)
        self.assertEqual(report["sink_tokens"], 0)
        sink_leaks = sorted(set(causal_pairs(LEN, 2, 2)) - set(causal_pairs(LEN, 2)))
        self.assertEqual(sink_leaks, [(i, j) for i in range(3, LEN) for j in (0, 1) if j < i - 2])
        self.assertEqual(pairs(report["leaks"]), sink_leaks)

    def test_unread_sink_tokens_are_a_warning(self):
        # A window without sinks checked against window + sinks: no leak, and
        # the sink pairs it never read are missing ('.').
        result = leakcheck("window_only", *SIZES, "--window", 2, "--sink-tokens", 2)
        self.assert_ok(result)
        self.assertIn("2 sink tokens", result.stdout)
        report = self.report("window_only", "--window", 2, "--sink-tokens", 2,
                             exit_code=clitest.EXIT_OK)
        self.assertEqual(report["leaks"], [])
        self.assertEqual(pairs(report["missing"]),
                         sorted(set(causal_pairs(LEN, 2, 2)) - set(causal_pairs(LEN, 2))))

    def test_tolerance_accepts_noise_below_it(self):
        report = self.report("noisy", "--tolerance", 1e-4, exit_code=clitest.EXIT_OK)
        self.assertEqual(report["verdict"], "causal")
        self.assertEqual(report["tolerance"], 1e-4)
        self.assertEqual(report["dependency"],
                         [[1 if j <= i else 0 for j in range(LEN)] for i in range(LEN)])

    def test_allow_nan_checks_and_reports_the_nan(self):
        report = self.report("all_nan", "--allow-nan", exit_code=clitest.EXIT_OK)
        # Every row of every run: (len + 2) runs x len rows x 2 heads.
        self.assertEqual(report["nan_rows"], (LEN + 2) * LEN * 2)

    def test_an_ignored_own_token_is_a_warning_not_a_leak(self):
        # Row 0 reads no key, so it never changes; row 1 reads key 0 only, and
        # a softmax over one key weighs it 1 whatever q1 is. (0, 0) and (1, 1)
        # are allowed but never observed; every later row sees its own q.
        report = self.report("strictly_past", exit_code=clitest.EXIT_OK)
        self.assertEqual(report["verdict"], "causal")
        self.assertEqual(report["leaks"], [])
        self.assertEqual(pairs(report["missing"]), [(0, 0), (1, 1)])
        text = leakcheck("strictly_past", *SIZES)
        self.assert_ok(text)
        lines = text.stdout.splitlines()
        self.assertIn("q0  .", lines)
        self.assertTrue(any(line.startswith("warning: 2 allowed dependencies never observed")
                            for line in lines), text.stdout)


class LeakcheckText(clitest.CliTestCase):
    def setUp(self):
        super().setUp()
        requires_numpy_python()

    def matrix(self, stdout):
        """The matrix lines of a text report: 'q0  S X', ..."""
        return [line for line in stdout.splitlines() if line.startswith("q")]

    def test_off_by_one_matrix_and_verdict(self):
        result = leakcheck("off_by_one", *SIZES)
        self.assertEqual(result.returncode, clitest.EXIT_FAILURE)
        self.assertEqual(result.stderr, "")
        expected = [f"q{i}  " + " ".join("S" * (i + 1) + ("X" if i + 1 < LEN else ""))
                    for i in range(LEN)]
        self.assertEqual(self.matrix(result.stdout), expected)
        self.assertEqual(result.stdout.splitlines()[-1],
                         "verdict: leak: output row 0 changed when position 1 changed, which it "
                         "must not see, in every head (7 leaking pairs)")

    def test_causal_matrix_is_the_lower_triangle(self):
        result = leakcheck("causal", *SIZES)
        self.assert_ok(result)
        self.assertEqual(self.matrix(result.stdout),
                         [f"q{i}  " + " ".join("S" * (i + 1)) for i in range(LEN)])
        self.assertTrue(result.stdout.splitlines()[-1].startswith("verdict: causal"))

    def test_one_head_leak_names_the_head_and_batch_element(self):
        result = leakcheck("one_head_leak", *SIZES, "--batch", 2)
        self.assertEqual(result.returncode, clitest.EXIT_FAILURE)
        self.assertIn("q2  S S S     X", self.matrix(result.stdout))
        self.assertIn("output row 2 changed when position 5 changed", result.stdout)
        self.assertIn("only in batch element 1 head 1", result.stdout)

    def test_out_writes_the_report_and_keeps_the_exit_code(self):
        path = self.path("report.json")
        result = leakcheck("no_mask", *SIZES, "--format", "json", "--out", path)
        self.assertEqual(result.returncode, clitest.EXIT_FAILURE)
        self.assertEqual(result.stdout, "")
        with open(path, encoding="utf-8") as file:
            self.assertEqual(json.load(file)["verdict"], "leak")

    def test_progress_goes_to_stderr_on_request(self):
        result = leakcheck("causal", *SIZES, "--progress", "--format", "json")
        self.assertEqual(result.returncode, clitest.EXIT_OK)
        self.assertIn(f"run {LEN + 2}/{LEN + 2}", result.stderr)
        self.assertEqual(json.loads(result.stdout)["verdict"], "causal")


class LeakcheckSvg(clitest.CliTestCase):
    def setUp(self):
        super().setUp()
        requires_numpy_python()

    def fills(self, program):
        result = leakcheck(program, *SIZES, "--format", "svg")
        root = ElementTree.fromstring(result.stdout)
        self.assertEqual(root.tag, SVG_NS + "svg")
        return result.returncode, {element.get("fill") for element in root.iter(SVG_NS + "path")}

    def test_leaks_are_drawn_in_red(self):
        code, fills = self.fills("no_mask")
        self.assertEqual(code, clitest.EXIT_FAILURE)
        self.assertIn(LEAK_RED, fills)

    def test_causal_matrix_has_no_red(self):
        code, fills = self.fills("causal")
        self.assertEqual(code, clitest.EXIT_OK)
        self.assertNotIn(LEAK_RED, fills)


class LeakcheckCommandErrors(clitest.CliTestCase):
    def setUp(self):
        super().setUp()
        requires_numpy_python()

    def test_failing_command_shows_its_exit_code_and_message(self):
        result = leakcheck("fails", *SIZES)
        self.assert_usage_error(result, mentions="exit code 3")
        self.assertIn("cannot load weights: no such file 'model.bin'", result.stderr)

    def test_wrong_output_shape_is_refused(self):
        # The program writes (batch, heads, seqlen, head_dim).
        result = leakcheck("wrong_shape", *SIZES)
        self.assert_usage_error(result, mentions="shape (1, 2, 8, 8)")
        self.assertIn("(1, 8, 2, 8)", result.stderr)

    def test_missing_output_is_refused(self):
        self.assert_usage_error(leakcheck("no_output", *SIZES), mentions="wrote no output")

    def assert_refused(self, program, *parts):
        """leakcheck on PROGRAM exits 2 with one line on stderr holding each of PARTS."""
        result = leakcheck(program, *SIZES)
        self.assert_usage_error(result, mentions=parts[0])
        for part in parts[1:]:
            self.assertIn(part, result.stderr)
        return result

    def test_integer_output_message_lists_exactly_the_accepted_dtypes(self):
        result = self.assert_refused("int_output", "'<i4'", "'<f4' or '<f8'")
        self.assertNotIn("<f2", result.stderr)

    def test_nondeterminism_is_not_a_leak(self):
        # Causal, with 1e-6 relative noise per run: the repeat of the base run
        # differs, so the check cannot judge, and says why.
        self.assert_refused("noisy", "nondeterministic: identical inputs changed outputs by up to",
                            "--tolerance")

    def test_all_nan_output_cannot_pass(self):
        self.assert_refused("all_nan", "NaN", "the base run", "--allow-nan")

    def test_command_must_name_every_file(self):
        result = run("leakcheck", "--exec", f"{PYTHON} prog.py {{q}} {{k}} {{v}}", *SIZES)
        self.assert_usage_error(result, mentions="{out}")


class LeakcheckHangs(clitest.CliTestCase):
    """A command that never ends: each test gives leakcheck a TMPDIR of its
    own, to see what it leaves there."""

    def setUp(self):
        super().setUp()
        self.tmpdir = self.path("tmp")
        os.mkdir(self.tmpdir)
        self.pids = self.path("pids")

    def sleeper(self):
        """A CMD that writes its shell's pid and its child's, then sleeps."""
        return (f"sleep 60 & echo $$ $! >> {shlex.quote(self.pids)}; wait # {{q}} {{k}} {{v}} "
                "{out}")

    def start(self, *args):
        return subprocess.Popen([binary(), "leakcheck", "--exec", self.sleeper(), *map(str, SIZES),
                                 *map(str, args)],
                                env={**os.environ, "TMPDIR": self.tmpdir},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for_pids(self, process):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.exists(self.pids) and os.path.getsize(self.pids) > 0:
                return
            time.sleep(0.05)
        self.fail(f"the command never started (exit {process.poll()})")

    def assert_cleaned_up(self):
        self.assertEqual(glob.glob(os.path.join(self.tmpdir, "lookback-leakcheck-*")), [])
        with open(self.pids, encoding="utf-8") as file:
            pids = [int(pid) for pid in file.read().split()]
        # SIGKILL is delivered at once but a process takes a moment to end;
        # only the shell is leakcheck's child to wait for.
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            with self.subTest(pid=pid):
                self.assertFalse(alive(pid), f"process {pid} of the command survived")

    def test_timeout_kills_the_run_and_names_it(self):
        began = time.monotonic()
        process = self.start("--timeout", 1)
        _, stderr = process.communicate(timeout=clitest.TIMEOUT_S)
        self.assertLess(time.monotonic() - began, 30)
        self.assertEqual(process.returncode, clitest.EXIT_USAGE, stderr)
        self.assertIn("timeout of 1 s on the base run", stderr)
        self.assert_cleaned_up()

    def test_sigterm_kills_the_command_and_removes_the_files(self):
        process = self.start()
        self.wait_for_pids(process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        self.assert_cleaned_up()
        self.assertEqual(process.returncode, -signal.SIGTERM, stderr)
        self.assertIn("interrupted by signal 15", stderr)
        self.assertIn("the base run", stderr)


def alive(pid):
    """Whether process `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class LeakcheckUsage(clitest.CliTestCase):
    def test_zero_length_is_refused(self):
        self.assert_usage_error(
            run("leakcheck", "--exec", command("causal"), "--len", 0, "--heads", 1, "--dim", 4),
            mentions="--len")

    def test_exec_needs_the_sizes(self):
        self.assert_usage_error(run("leakcheck", "--exec", command("causal"), "--heads", 1,
                                    "--dim", 4), mentions="--len")

    def test_heads_must_be_a_multiple_of_kv_heads(self):
        self.assert_usage_error(run("leakcheck", "--exec", command("causal"), "--len", 4,
                                    "--heads", 3, "--kv-heads", 2, "--dim", 4), mentions="--heads")

    def test_sink_tokens_need_a_window(self):
        result = run("leakcheck", "--exec", command("window_sinks"), *SHAPE, "--sink-tokens", 2)
        self.assert_usage_error(result, mentions="--sink-tokens: 2 without --window")

    def test_window_needs_a_causal_mask(self):
        self.assert_usage_error(run("leakcheck", "--exec", command("causal"), "--len", 4,
                                    "--heads", 1, "--dim", 4, "--causal", "none", "--window", 1),
                                mentions="window")

    def test_unknown_format_is_refused(self):
        self.assert_usage_error(run("leakcheck", "--format", "png"), mentions="--format")

    def test_builtin_mode_draws_no_svg(self):
        self.assert_usage_error(run("leakcheck", "--format", "svg"), mentions="--format")


class LeakcheckBuiltin(clitest.CliTestCase):
    """Without --exec: every lookback path, storage dtype and window."""

    def test_every_path_is_causal(self):
        result = run("leakcheck", "--jobs", 2)
        self.assert_ok(result)
        lines = result.stdout.splitlines()
        self.assertIn("path", lines[3])
        rows = [line.split() for line in lines[4:] if line.strip()]
        self.assertTrue(any(row[0] == "prefill" for row in rows), result.stdout)
        self.assertNotIn("leak", " ".join(lines[4:-1]))
        # Every path, and the chunked one again over a ring cache.
        self.assertEqual(sum("window 6, 2 sink tokens" in line for line in lines[4:]), 6)
        self.assertEqual(sum("ring cache" in line for line in lines[4:]), 1)
        self.assertEqual(sum("sink logits" in line for line in lines[4:]), 5)
        self.assertTrue(lines[-1].startswith("verdict: causal"), lines[-1])

    def test_json_lists_every_path_dtype_and_window(self):
        result = run("leakcheck", "--jobs", 2, "--format", "json")
        self.assert_ok(result)
        report = json.loads(result.stdout)
        self.assertEqual(report["verdict"], "causal")
        checks = report["checks"]
        self.assertEqual({check["path"] for check in checks},
                         {"prefill", "decode", "chunked", "paged", "split"})
        self.assertEqual({check["storage"] for check in checks},
                         {"f32", "bf16", "f16", "int8", "fp8e4m3", "fp8e5m2"})
        self.assertEqual({check["window"] is None for check in checks}, {True, False})
        # Four configurations per path: none, window, window + sink tokens, sink
        # logits; and the chunked path over a ring cache, with window and sinks.
        self.assertEqual(len(checks), 5 * 6 * 4 + 6)
        rings = [check for check in checks if check["ring_cache"]]
        self.assertEqual({(c["path"], c["window"], c["sink_tokens"]) for c in rings},
                         {("chunked", 6, 2)})
        self.assertEqual(len(rings), 6)
        configs = {(check["window"], check["sink_tokens"], check["sink_logits"])
                   for check in checks}
        self.assertEqual(configs, {(None, 0, False), (6, 0, False), (6, 2, False),
                                   (None, 0, True)})
        for check in checks:
            with self.subTest(check=check):
                self.assertEqual(check["verdict"], "causal")
                self.assertEqual(check["leaks"], [])
                self.assertEqual(check["missing"], [])
        # prefill exists from the start.
        self.assertTrue(all(check["verdict"] == "causal" for check in checks
                            if check["path"] == "prefill"))

    def test_sizes_can_be_chosen(self):
        result = run("leakcheck", "--len", 9, "--heads", 2, "--dim", 8, "--batch", 1,
                     "--format", "json")
        self.assert_ok(result)
        self.assertEqual(json.loads(result.stdout)["len"], 9)

    def test_sink_tokens_can_be_chosen(self):
        result = run("leakcheck", "--len", 9, "--heads", 2, "--dim", 8, "--batch", 1,
                     "--window", 3, "--sink-tokens", 1, "--format", "json")
        self.assert_ok(result)
        checks = json.loads(result.stdout)["checks"]
        self.assertEqual({check["sink_tokens"] for check in checks}, {0, 1})
        self.assert_usage_error(run("leakcheck", "--sink-tokens", 0), mentions="--sink-tokens")

    def test_head_dim_past_the_limit_is_a_usage_error(self):
        self.assert_usage_error(run("leakcheck", "--dim", 257), mentions="head_dim 257")

    def test_exec_only_options_are_refused(self):
        self.assert_usage_error(run("leakcheck", "--per-head"), mentions="--per-head")
        self.assert_usage_error(run("leakcheck", "--tolerance", 0.1), mentions="--tolerance")
        self.assert_usage_error(run("leakcheck", "--timeout", 5), mentions="--timeout")
        self.assert_usage_error(run("leakcheck", "--allow-nan"), mentions="--allow-nan")
        self.assert_usage_error(run("leakcheck", "--causal", "top-left"), mentions="--causal")


if __name__ == "__main__":
    unittest.main()
