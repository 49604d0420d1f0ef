"""lst-pipeline: Ladder Side-Tuning from an activation cache."""

import os

# OpenMP threads that spin while waiting make small torch ops 10-40x slower as soon as another
# process wants the same cores (measured here on 2 cores). Must be set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
