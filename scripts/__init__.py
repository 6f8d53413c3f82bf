"""Set-up, test and demo scripts. A package so that ``python -m scripts.demo`` (what ``scripts/demo.sh``
runs, from the repo root) and the tests import ``scripts.workflows`` without touching ``sys.path``."""
