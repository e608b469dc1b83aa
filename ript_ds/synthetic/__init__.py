"""Scaffolding for the CPU learning check, the demo and the tests, outside RIPT's algorithm (rl/).

- bc.py: `SyntheticSetup` (every number of the synthetic learning check), scripted demos on the
  synthetic env, behaviour cloning to a decent-but-imperfect starting policy, its evaluation;
- learning.py: the BC warm start saved as a canonical checkpoint, and the config overrides that run
  RIPT from it through the real trainer (tests/test_learning.py, `make demo`, tools/bench).
"""
