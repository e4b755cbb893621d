"""`lookback pattern`: which keys each query is scored against.

Expected outputs are written out by hand from DESIGN.md section 2 and the seed
notes (sequence of 7: query i sees keys 0..i, 28 of 49 interactions), so these
tests check the printer against the contract, not against itself.
"""

import json
import os
import unittest
import xml.etree.ElementTree as ElementTree

import clitest
from clitest import run

SVG_NS = "{http://www.w3.org/2000/svg}"

# The seed notes' listing for a sequence of 7, in our notation.
SEED_LEN7 = """\
q0: q0·k0ᵀ
q1: q1·k0ᵀ, q1·k1ᵀ
q2: q2·k0ᵀ, q2·k1ᵀ, q2·k2ᵀ
q3: q3·k0ᵀ, q3·k1ᵀ, q3·k2ᵀ, q3·k3ᵀ
q4: q4·k0ᵀ, q4·k1ᵀ, q4·k2ᵀ, q4·k3ᵀ, q4·k4ᵀ
q5: q5·k0ᵀ, q5·k1ᵀ, q5·k2ᵀ, q5·k3ᵀ, q5·k4ᵀ, q5·k5ᵀ
q6: q6·k0ᵀ, q6·k1ᵀ, q6·k2ᵀ, q6·k3ᵀ, q6·k4ᵀ, q6·k5ᵀ, q6·k6ᵀ
28 query-key interactions of 49 (57.1%)
"""


def matrix(*rows):
    """A matrix output from rows written as 'SS000'."""
    return "".join(" ".join(row) + "\n" for row in rows)


def keys_from_text_line(line):
    """Key indices of a text line 'q3: q3·k0ᵀ, q3·k1ᵀ' -> (3, [0, 1])."""
    head, _, tail = line.partition(": ")
    query = int(head[1:])
    if tail == "(no visible keys)":
        return query, []
    keys = []
    for item in tail.split(", "):
        left, _, right = item.partition("·k")
        assert left == f"q{query}" and right.endswith("ᵀ"), item
        keys.append(int(right[:-1]))
    return query, keys


class PatternText(clitest.CliTestCase):
    def test_len7_is_the_seed_listing(self):
        result = run("pattern", "--len", 7)
        self.assert_ok(result)
        self.assertEqual(result.stdout, SEED_LEN7)

    def test_text_is_the_default_format(self):
        self.assertEqual(run("pattern", "--len", 7, "--format", "text").stdout,
                         run("pattern", "--len", 7).stdout)

    def test_query_shows_one_row_and_counts_its_keys(self):
        # The seed's question: in a sequence of 8, query 5 meets 6 keys.
        result = run("pattern", "--len", 8, "--query", 5)
        self.assert_ok(result)
        self.assertEqual(result.stdout,
                         "q5: q5·k0ᵀ, q5·k1ᵀ, q5·k2ᵀ, q5·k3ᵀ, q5·k4ᵀ, q5·k5ᵀ\n"
                         "6 query-key interactions of 8 (75.0%)\n")

    def test_single_interaction_is_singular(self):
        result = run("pattern", "--len", 1)
        self.assert_ok(result)
        self.assertEqual(result.stdout, "q0: q0·k0ᵀ\n1 query-key interaction of 1 (100.0%)\n")

    def test_square_counts_are_triangular(self):
        # sq = sk = n: n(n+1)/2 of n^2, whichever alignment.
        for n in (2, 3, 10, 33, 64):
            for causal in ("bottom-right", "top-left"):
                with self.subTest(n=n, causal=causal):
                    result = run("pattern", "--len", n, "--causal", causal)
                    self.assert_ok(result)
                    lines = result.stdout.splitlines()
                    self.assertEqual(len(lines), n + 1)
                    for i, line in enumerate(lines[:-1]):
                        self.assertEqual(keys_from_text_line(line), (i, list(range(i + 1))))
                    total = n * (n + 1) // 2
                    self.assertEqual(
                        lines[-1],
                        f"{total} query-key interactions of {n * n} ({100 * total / n / n:.1f}%)")

    def test_rows_without_keys(self):
        # sq = 5, sk = 3, bottom-right: p(i) = i - 2, so rows 0 and 1 see nothing.
        result = run("pattern", "--len", 5, "--seqlen-k", 3)
        self.assert_ok(result)
        self.assertEqual(result.stdout,
                         "q0: (no visible keys)\n"
                         "q1: (no visible keys)\n"
                         "q2: q2·k0ᵀ\n"
                         "q3: q3·k0ᵀ, q3·k1ᵀ\n"
                         "q4: q4·k0ᵀ, q4·k1ᵀ, q4·k2ᵀ\n"
                         "6 query-key interactions of 15 (40.0%)\n")

    def test_window_counts_its_own_key(self):
        # W = 2: query i sees keys i-2..i, 3 keys at most.
        result = run("pattern", "--len", 6, "--window", 2)
        self.assert_ok(result)
        lines = result.stdout.splitlines()
        self.assertEqual([keys_from_text_line(line)[1] for line in lines[:-1]],
                         [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]])
        self.assertEqual(lines[-1], "15 query-key interactions of 36 (41.7%)")

    def test_window_zero_sees_only_itself(self):
        result = run("pattern", "--len", 4, "--window", 0, "--format", "matrix")
        self.assert_ok(result)
        self.assertEqual(result.stdout, matrix("S000", "0S00", "00S0", "000S"))

    def test_sink_tokens_stay_visible_beside_the_window(self):
        # StreamingLLM: W = 3, S = 2; rows 6.. see the two sinks and 4 keys.
        result = run("pattern", "--len", 12, "--window", 3, "--sink-tokens", 2)
        self.assert_ok(result)
        lines = result.stdout.splitlines()
        self.assertEqual(keys_from_text_line(lines[4])[1], [0, 1, 2, 3, 4])
        self.assertEqual(keys_from_text_line(lines[11])[1], [0, 1, 8, 9, 10, 11])
        self.assertEqual(lines[-1], "57 query-key interactions of 144 (39.6%)")
        result = run("pattern", "--len", 6, "--window", 1, "--sink-tokens", 1, "--format", "matrix")
        self.assert_ok(result)
        self.assertEqual(result.stdout, matrix("S00000", "SS0000", "SSS000", "S0SS00", "S00SS0",
                                               "S000SS"))
        self.assert_usage_error(run("pattern", "--len", 4, "--sink-tokens", 2),
                                mentions="--sink-tokens")

    def test_causal_none_sees_everything(self):
        result = run("pattern", "--len", 7, "--causal", "none")
        self.assert_ok(result)
        self.assertTrue(result.stdout.endswith("49 query-key interactions of 49 (100.0%)\n"))


class PatternMatrix(clitest.CliTestCase):
    def test_len4(self):
        result = run("pattern", "--len", 4, "--format", "matrix")
        self.assert_ok(result)
        self.assertEqual(result.stdout, "S 0 0 0\nS S 0 0\nS S S 0\nS S S S\n")

    def test_query_row(self):
        result = run("pattern", "--len", 4, "--format", "matrix", "--query", 2)
        self.assert_ok(result)
        self.assertEqual(result.stdout, "S S S 0\n")

    def test_bottom_right_vs_top_left_with_more_keys(self):
        # sq = 3 new queries after 2 cached keys (DESIGN.md section 2).
        bottom_right = run("pattern", "--len", 3, "--seqlen-k", 5, "--format", "matrix")
        self.assert_ok(bottom_right)
        self.assertEqual(bottom_right.stdout, matrix("SSS00", "SSSS0", "SSSSS"))
        top_left = run("pattern", "--len", 3, "--seqlen-k", 5, "--format", "matrix",
                       "--causal", "top-left")
        self.assert_ok(top_left)
        self.assertEqual(top_left.stdout, matrix("S0000", "SS000", "SSS00"))

    def test_bottom_right_vs_top_left_with_fewer_keys(self):
        bottom_right = run("pattern", "--len", 5, "--seqlen-k", 3, "--format", "matrix")
        self.assertEqual(bottom_right.stdout, matrix("000", "000", "S00", "SS0", "SSS"))
        top_left = run("pattern", "--len", 5, "--seqlen-k", 3, "--format", "matrix",
                       "--causal", "top-left")
        self.assertEqual(top_left.stdout, matrix("S00", "SS0", "SSS", "SSS", "SSS"))

    def test_window_with_more_keys(self):
        # p(i) = i + 3, W = 1: keys p-1..p.
        result = run("pattern", "--len", 3, "--seqlen-k", 6, "--window", 1, "--format", "matrix")
        self.assert_ok(result)
        self.assertEqual(result.stdout, matrix("00SS00", "000SS0", "0000SS"))


class PatternJson(clitest.CliTestCase):
    def test_len8_query5(self):
        result = run("pattern", "--len", 8, "--query", 5, "--format", "json")
        self.assert_ok(result)
        doc = json.loads(result.stdout)
        self.assertEqual(doc["rows"], [{"query": 5, "keys": [0, 1, 2, 3, 4, 5]}])
        self.assertEqual(doc["seqlen_q"], 8)
        self.assertEqual(doc["seqlen_k"], 8)
        self.assertEqual(doc["causal"], "bottom-right")
        self.assertIsNone(doc["window"])
        self.assertEqual(doc["query"], 5)
        # With --query the counts are of that row, as in the text summary.
        self.assertEqual(doc["interactions"], 6)
        self.assertEqual(doc["full"], 8)

    def test_whole_matrix(self):
        result = run("pattern", "--len", 3, "--seqlen-k", 5, "--window", 1,
                     "--causal", "top-left", "--format", "json")
        self.assert_ok(result)
        doc = json.loads(result.stdout)
        self.assertEqual(doc, {
            "seqlen_q": 3, "seqlen_k": 5, "causal": "top-left", "window": 1, "query": None,
            "interactions": 5, "full": 15,
            "rows": [{"query": 0, "keys": [0]}, {"query": 1, "keys": [0, 1]},
                     {"query": 2, "keys": [1, 2]}]})

    def test_empty_row_has_no_keys(self):
        doc = json.loads(run("pattern", "--len", 4, "--seqlen-k", 2, "--format", "json").stdout)
        self.assertEqual([row["keys"] for row in doc["rows"]], [[], [], [0], [0, 1]])
        self.assertEqual(doc["interactions"], 3)

    def test_formats_agree(self):
        # text, matrix and json are three views of one mask: they must list the
        # same keys and the same counts.
        cases = [
            ("--len", 7),
            ("--len", 9, "--seqlen-k", 4),
            ("--len", 4, "--seqlen-k", 9, "--causal", "top-left"),
            ("--len", 6, "--seqlen-k", 11, "--window", 3),
            ("--len", 11, "--seqlen-k", 6, "--window", 2, "--causal", "top-left"),
            ("--len", 5, "--seqlen-k", 3, "--causal", "none"),
        ]
        for args in cases:
            with self.subTest(args=args):
                doc = json.loads(run("pattern", *args, "--format", "json").stdout)
                text = run("pattern", *args).stdout.splitlines()
                grid = run("pattern", *args, "--format", "matrix").stdout.splitlines()
                self.assertEqual(len(doc["rows"]), doc["seqlen_q"])
                for row, line, cells in zip(doc["rows"], text, grid):
                    self.assertEqual(keys_from_text_line(line), (row["query"], row["keys"]))
                    self.assertEqual([j for j, c in enumerate(cells.split()) if c == "S"],
                                     row["keys"])
                interactions = sum(len(row["keys"]) for row in doc["rows"])
                self.assertEqual(doc["interactions"], interactions)
                self.assertEqual(doc["full"], doc["seqlen_q"] * doc["seqlen_k"])
                self.assertTrue(text[-1].startswith(
                    f"{interactions} query-key interaction"))
                self.assertIn(f" of {doc['full']} (", text[-1])


class PatternSvg(clitest.CliTestCase):
    def parse(self, svg):
        root = ElementTree.fromstring(svg.encode("utf-8"))
        self.assertEqual(root.tag, SVG_NS + "svg")
        return root

    def texts(self, root):
        return ["".join(node.itertext()) for node in root.iter(SVG_NS + "text")]

    def test_len7_is_labelled(self):
        result = run("pattern", "--len", 7, "--format", "svg")
        self.assert_ok(result)
        root = self.parse(result.stdout)
        texts = self.texts(root)
        for i in range(7):
            self.assertIn(f"q{i}", texts)
            self.assertIn(f"k{i}", texts)
        self.assertIn("28 query-key interactions of 49 (57.1%)", texts)

    def test_len512_stays_small(self):
        result = run("pattern", "--len", 512, "--format", "svg")
        self.assert_ok(result)
        self.assertLess(len(result.stdout.encode("utf-8")), 200_000)
        root = self.parse(result.stdout)
        texts = self.texts(root)
        # 512 * 513 / 2 of 512^2.
        self.assertIn("131328 query-key interactions of 262144 (50.1%)", texts)
        # Only a few tick labels, not 512 of each.
        self.assertLess(sum(t.startswith("q") for t in texts), 40)
        self.assertLess(sum(t.startswith("k") for t in texts), 40)
        self.assertIn("q0", texts)
        self.assertIn("k0", texts)

    def test_other_shapes_parse(self):
        for args in [("--len", 3, "--seqlen-k", 5),
                     ("--len", 5, "--seqlen-k", 3, "--causal", "top-left"),
                     ("--len", 100, "--window", 9),
                     ("--len", 700, "--seqlen-k", 5),
                     ("--len", 8, "--query", 5),
                     ("--len", 2048, "--query", 2047),
                     ("--len", 4, "--causal", "none")]:
            with self.subTest(args=args):
                result = run("pattern", *args, "--format", "svg")
                self.assert_ok(result)
                self.parse(result.stdout)


class PatternOutput(clitest.CliTestCase):
    def test_out_writes_the_file_and_nothing_to_stdout(self):
        for fmt in ("text", "matrix", "json", "svg"):
            with self.subTest(format=fmt):
                out = self.path(f"pattern.{fmt}")
                result = run("pattern", "--len", 7, "--format", fmt, "--out", out)
                self.assert_ok(result)
                self.assertEqual(result.stdout, "")
                with open(out, encoding="utf-8") as f:
                    self.assertEqual(f.read(), run("pattern", "--len", 7, "--format", fmt).stdout)

    def test_out_replaces_an_existing_file(self):
        out = self.path("pattern.txt")
        with open(out, "w", encoding="utf-8") as f:
            f.write("old contents that are longer than the new ones " * 100)
        self.assert_ok(run("pattern", "--len", 7, "--out", out))
        with open(out, encoding="utf-8") as f:
            self.assertEqual(f.read(), SEED_LEN7)
        self.assertEqual(os.listdir(self.tmp), ["pattern.txt"])

    def test_help_explains_the_command(self):
        result = run("pattern", "--help")
        self.assertEqual(result.returncode, clitest.EXIT_OK)
        for words in ("--len", "--query", "--window", "--causal", "--format", "--out",
                      "query-key interactions", "top-left", "bottom-right"):
            self.assertIn(words, result.stdout)


class PatternErrors(clitest.CliTestCase):
    # (arguments after 'pattern', a word the one stderr line must contain)
    BAD = [
        (("--len", 0), "--len"),
        (("--len", -3), "--len"),
        (("--len=-3",), "--len"),
        (("--len", "seven"), "--len"),
        ((), "--len"),
        (("--len", 7, "--seqlen-k", 0), "--seqlen-k"),
        (("--len", 7, "--query", 7), "--query"),
        (("--len", 7, "--query", -1), "--query"),
        (("--len", 7, "--format", "png"), "--format"),
        (("--len", 7, "--causal", "sideways"), "--causal"),
        (("--len", 7, "--window", -1), "--window"),
        (("--len", 7, "--window", 2, "--causal", "none"), "window"),
        (("--len", 100000), "--len"),
        (("--len", 7, "--bogus"), "--bogus"),
    ]

    def test_bad_arguments_exit_2_with_one_line_and_no_file(self):
        for args, mentions in self.BAD:
            with self.subTest(args=args):
                out = self.path("out.txt")
                result = run("pattern", *args, "--out", out)
                self.assert_usage_error(result, mentions)
                self.assertEqual(os.listdir(self.tmp), [], "an output file was left behind")

    def test_bad_arguments_without_out(self):
        for args, mentions in self.BAD:
            with self.subTest(args=args):
                self.assert_usage_error(run("pattern", *args), mentions)

    def test_unwritable_out(self):
        result = run("pattern", "--len", 7, "--out", self.path("missing-folder/out.txt"))
        self.assert_usage_error(result)
        self.assertEqual(os.listdir(self.tmp), [])


if __name__ == "__main__":
    unittest.main()
