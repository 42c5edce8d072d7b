# The two commands of the README. Both install everything first (idempotent, fast when already done).
.PHONY: setup scan test lint bench

setup:
	bash scripts/setup.sh

# The main job on the embedded default model (SmolLM2-135M-Instruct): the checkup, report in runs/.
scan: setup
	.venv/bin/mri scan

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=8

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench
	.venv/bin/pyright

bench: setup
	.venv/bin/python bench/harvest.py --json
