"""The evidence workload (``./dev demo``): VM-like guests with page caches, a static partition of
memory against tmem, side by side. runner.py orchestrates, guest.py is one guest process,
report.py prints and draws."""
