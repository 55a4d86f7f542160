"""Reinforcement learning: DDPG and TD3 as an RLlib algorithm, and the ``rl.ddpg`` stage.

- ``ddpg.py``: ``DDPGConfig`` / ``DDPG`` / ``TD3Config`` (RLlib AlgorithmConfig + Algorithm)
- ``module.py``: the networks (RLModule); ``learner.py``: the update (TorchLearner)
- ``replay.py``: flat array replay; ``noise.py``: Ornstein-Uhlenbeck noise connector
- ``stage.py``: the pipeline stage; ``policy.py``: the exported policy and ``rollout``

Only ``stage.py`` is imported by the registry; it keeps Ray, RLlib and torch out until ``run``.
"""
