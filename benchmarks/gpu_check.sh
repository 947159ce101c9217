#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run (a few minutes): the GPU tests (skipped
# without CUDA everywhere else), then the end-to-end figures of docs/benchmarks.md, "On a GPU".
# Run from the repository root in an environment with the test extra installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q -p no:cacheprovider -m gpu
python benchmarks/end_to_end.py --device cuda --queries 8192 --batch 1024 --sizes 10000 100000 --train-rounds 5
