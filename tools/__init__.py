"""
Tools that drive real rtunnel processes from a source checkout: the process
harness (used by the end-to-end tests and the benchmarks) and the demo
(``make demo``). They are not part of the installed package: they put this
checkout on PYTHONPATH for the ``twistd`` processes they start.
"""
