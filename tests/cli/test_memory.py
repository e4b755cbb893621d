"""Out of memory, said clearly: sizes beyond this machine's memory are refused
before anything is allocated, naming the argument and the bytes; an
allocation that fails anyway names what it was for; capacity that holds no
tokens costs no memory; and whatever else runs out of memory is one line and
exit code 2, never the bare 'std::bad_alloc' (issue 18, item 11)."""

import os
import resource
import subprocess

import numpy as np

from clitest import EXIT_OK, CliTestCase, run, run_measured, sanitized
from test_attend import sparse_npy

# Far beyond any machine's memory: 2^40 tokens of 256 bytes, twice (K and V).
HUGE_CAPACITY = 1 << 40
# An address-space limit that the allocations below exceed while the
# machine's memory holds them easily.
LIMIT_BYTES = 512 << 20


def limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


class MemoryTest(CliTestCase):
    def setUp(self):
        super().setUp()
        # 40 tokens, 2 kv heads, head_dim 24 (stored padded to 32): 256 bytes a token.
        rng = np.random.default_rng(5)
        self.k, self.v = self.path("k.npy"), self.path("v.npy")
        for path in (self.k, self.v):
            np.save(path, rng.standard_normal((40, 2, 24)).astype(np.float32))
        self.out = self.path("c.lbkv")

    def save(self, *extra):
        return run("cache", "save", "--k", self.k, "--v", self.v, "--out", self.out, *extra)

    def run_limited(self, *args):
        """`lookback ARGS...` under an address-space limit (skipped under
        sanitizers, whose shadow memory needs far more address space)."""
        if sanitized():
            self.skipTest("sanitizers reserve far more address space than the limit")
        return subprocess.run([os.environ["LOOKBACK_BIN"], *map(str, args)], capture_output=True,
                              text=True, preexec_fn=limit_address_space, timeout=60, check=False)

    def test_sizes_beyond_the_machine_are_refused_naming_argument_and_bytes(self):
        cases = [
            (["--capacity", HUGE_CAPACITY], "capacity: 1099511627776 tokens need"),
            (["--paged", "--num-blocks", "100000000"], "num_blocks: 100000000 blocks of 16 tokens"),
            (["--paged", "--block-size", "1000000000000"], "block_size: 1000000000000 tokens"),
        ]
        for extra, mention in cases:
            with self.subTest(extra=extra):
                result = self.save(*extra)
                self.assert_usage_error(result, mention)
                self.assertIn("bytes", result.stderr)
                self.assertIn("this machine's memory", result.stderr)
                self.assertNotIn("bad_alloc", result.stderr)
                self.assertFalse(os.path.exists(self.out))

    def test_unused_capacity_is_not_touched(self):
        """4,000,000 tokens of capacity (2 GB for K and V) for 40 tokens: the
        checkpoint holds the 40, and the process never touches the rest."""
        result, _, peak_bytes = run_measured("cache", "save", "--k", self.k, "--v", self.v,
                                             "--out", self.out, "--capacity", "4000000")
        self.assertEqual(result.returncode, EXIT_OK, result.stderr)
        self.assertLess(os.path.getsize(self.out), 64 << 10)
        if not sanitized():  # shadow memory makes the resident set meaningless
            self.assertLess(peak_bytes, 256 << 20)

    def test_an_allocation_that_fails_names_what_it_was_for(self):
        # 2^22 tokens: 1 GiB for K, within the machine but not within the limit.
        result = self.run_limited("cache", "save", "--k", self.k, "--v", self.v,
                                  "--out", self.out, "--capacity", 1 << 22)
        self.assert_usage_error(result, "capacity: out of memory allocating 1073741824 bytes")
        q = sparse_npy(self.path("q_1gib.npy"), (1, 1 << 20, 16, 16))
        k = self.path("k4.npy")
        np.save(k, np.zeros((1, 4, 16, 16), np.float32))
        result = self.run_limited("attend", "--q", q, "--k", k, "--v", k,
                                  "--out", self.path("o.npy"))
        # The data's bytes: the header is read apart, the array mapped.
        self.assert_usage_error(result, "q_1gib.npy: out of memory allocating 1073741824 bytes")

    def test_any_other_bad_alloc_is_one_clear_line(self):
        # A cost table of 10^9 positions does not fit under the limit.
        result = self.run_limited("cost", "--len", "1000000000", "--heads", "1",
                                  "--kv-heads", "1", "--dim", "16")
        self.assert_usage_error(result, "lookback: out of memory")
        self.assertNotIn("bad_alloc", result.stderr)
