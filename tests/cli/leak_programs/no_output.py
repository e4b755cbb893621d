"""Exits 0 without writing the output file."""
