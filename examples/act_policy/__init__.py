"""An ACT-style chunking policy for the reference task: a chunk of H = 16 wheel commands per inference.

`examples.act_policy.policy:make_policy` is its `build-engines --policy` factory; `train.py` trains its
head by imitation of the scripted expert; `evaluate.py` checks it in closed loop with chunk execution.
"""
