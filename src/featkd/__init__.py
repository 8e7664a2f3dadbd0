"""featkd: logit-free feature knowledge distillation of image classifiers.

Implements "Logit-Based Losses Limit the Effectiveness of Feature Knowledge
Distillation" (Cooper et al., NeurReps 2025, arXiv 2511.14981).
"""

__version__ = "0.1.0"
