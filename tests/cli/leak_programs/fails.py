"""Fails the way a real program does: a message on stderr, exit code 3."""
import sys

print("attention.py: cannot load weights: no such file 'model.bin'", file=sys.stderr)
sys.exit(3)
