"""Multi-device tests: collected only inside the subprocesses that tests/test_parallel.py starts.

They need several (fake CPU) devices, fixed when JAX starts, so they cannot run in the main pytest process (one
device, whose results the README's tables depend on). ``tests/test_parallel.py`` runs this directory as
``python -m pytest tests/multidevice`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and
``GSU_JAX_MULTIDEVICE=8``; otherwise nothing here is collected.
"""

import os

collect_ignore_glob = [] if os.environ.get("GSU_JAX_MULTIDEVICE") else ["test_*.py"]
