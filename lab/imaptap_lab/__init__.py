"""imaptap's development lab: a real Dovecot in a network namespace, the captures in pcaps/, the
benchmarks, the fuzz driver and the check against older kernels' verifiers.

Each module is one job, and ``scripts/`` holds a thin entry point per job.  Nothing here is
part of imaptap itself, and nothing of imaptap imports it.  This file imports nothing: the fuzz
driver must be able to import the package before atheris instruments imaptap.
"""
