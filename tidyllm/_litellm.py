"""The one place tidyllm imports LiteLLM.

LiteLLM fetches a price map from the internet at import unless ``LITELLM_LOCAL_MODEL_COST_MAP``
is set; enterprise networks block that fetch and it stalls for seconds. tidyllm makes the local
map its default, and a user who sets the variable (to anything) keeps their choice.
"""

from __future__ import annotations

import os
from types import ModuleType


def import_litellm() -> ModuleType:
    """Import and return ``litellm`` with tidyllm's offline-price-map default applied."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    # The "Give Feedback / Get Help" banner LiteLLM prints on every error is noise in notebooks.
    litellm.suppress_debug_info = True
    return litellm
