"""The learning router's estimator and its evaluation, importable without LiteLLM.

- :class:`RouteBandit` chooses a route among the candidates of each call and learns from rewards;
- :func:`reward` is the objective it learns (quality, cost, latency, failure);
- :func:`evaluate` estimates off-policy what another policy would have earned on logged decisions.

Simulated environments for tests and benchmarks live in :mod:`tidyllm.routing.environments`.
"""

from tidyllm.routing.bandit import DEFAULT_REWARD_WEIGHTS, Choice, RouteBandit, reward
from tidyllm.routing.evaluation import Estimate, Evaluation, evaluate

__all__ = ["Choice", "DEFAULT_REWARD_WEIGHTS", "Estimate", "Evaluation", "RouteBandit", "evaluate", "reward"]
