"""Which PushT scenes are for recording and which for evaluation, and the task they share.

Kept free of heavy imports: the `fedbot` CLI's parser reads these, and `fedbot status` should not
wait seconds for torch and lerobot to load.
"""

DEFAULT_TASK = "Push the T-shaped block onto the T-shaped target."
# Recording draws scenes from seeds below EVAL_SEED_START; evaluation from seeds at or above it.
EVAL_SEED_START = 100_000
