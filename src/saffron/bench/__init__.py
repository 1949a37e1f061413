"""Benchmarks behind ``saffron bench ...``: each prints the figures an issue asks for, as JSON."""
