"""The LiteLLM bridge: every tidyllm class that touches LiteLLM objects, defined at module level.

- :mod:`~tidyllm.litellm_bridge.callbacks` — the callbacks registered with LiteLLM (the async
  pre-call gate for plain SDK calls, the settlement events);
- :mod:`~tidyllm.litellm_bridge.strategy` — the Router strategy (governed, health-aware routing);
- :mod:`~tidyllm.litellm_bridge.provider` — the ``tidyllm/`` provider prefix;
- :mod:`~tidyllm.litellm_bridge.instrument` — the sync entry points (``litellm.completion`` ...);
- :mod:`~tidyllm.litellm_bridge.records` — LiteLLM's callback dicts and stream objects read into
  tidyllm's frozen records;
- :mod:`~tidyllm.litellm_bridge.streams` — governed streams;
- :mod:`~tidyllm.litellm_bridge.tokens` — token counts with LiteLLM's tokenizers;
- :mod:`~tidyllm.litellm_bridge.errors` — the refusals that carry LiteLLM's no-retry contract;
- :mod:`~tidyllm.litellm_bridge.exit` — settlement at interpreter exit.

Everything else in tidyllm works on :class:`tidyllm.governance.gate.RequestFacts`,
:class:`tidyllm.records.CallRecord` and the admission the gate seals. Importing this package
imports LiteLLM (seconds): tidyllm imports it on first use only.
"""

from tidyllm._litellm import import_litellm

# before any submodule imports litellm: tidyllm's offline price-map default must be in place
import_litellm()
