"""The benchmarks behind the README's figures, one module each; run them with ``python -m pipeline.bench``.

Importing the package imports nothing else: each benchmark's module is imported only when it runs.
"""
