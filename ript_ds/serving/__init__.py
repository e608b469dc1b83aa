"""Serving a checkpoint to the clients robots already use (openpi's websocket protocol).

- policy.py: `load_policy(checkpoint_dir, tokenizer_path=None, device=None) -> Policy` and
  `Policy.infer(obs, noise=None) -> {"actions": [H, 7], "policy_timing": ...}`, openpi's contract;
- server.py / msgpack_numpy.py: the websocket server (launch/serve.py) and openpi's array encoding.
"""

from ript_ds.serving.policy import Policy, PolicyInputError, PolicyLoadError, load_policy

__all__ = ["Policy", "PolicyInputError", "PolicyLoadError", "load_policy"]
