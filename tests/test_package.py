"""The package surface: cheap import, no global side effects, the public names."""

from __future__ import annotations

import json
import subprocess
import sys

import tidyllm

HEAVY = {"litellm", "sklearn", "pandas", "sqlalchemy", "IPython", "mlflow", "numpy", "alembic"}


def test_import_is_cheap_and_has_no_side_effects() -> None:
    code = (
        "import os, sys, json; before = dict(os.environ); import tidyllm, tidyllm.errors, tidyllm.settings; "
        "print(json.dumps({'mods': sorted({m.split('.')[0] for m in sys.modules}), 'env': dict(os.environ) == before}))"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    data = json.loads(out.stdout)
    assert not HEAVY & set(data["mods"]), HEAVY & set(data["mods"])
    assert data["env"] is True


def test_routing_imports_without_litellm() -> None:
    code = "import sys, tidyllm.routing; print('litellm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names() -> None:
    expected = {"install", "uninstall", "Platform", "TidyLLMGateway", "EnterpriseConfig", "TidyMart",
                "get_tidymart", "Settings", "load_settings", "TidyLLMError", "ConfigurationError",
                "GatewayConfigError", "StorageError", "SchemaVersionError", "GovernanceError", "MetadataError",
                "UnpricedModelError", "BudgetExceededError", "RouteNotAuthorizedError", "RateLimitedError",
                "GatewayError", "RoutingError", "__version__", "load_ipython_extension", "unload_ipython_extension"}
    assert set(tidyllm.__all__) == expected
    for name in expected:
        assert getattr(tidyllm, name) is not None


def test_budget_error_is_litellms_and_ours() -> None:
    import litellm

    from tidyllm.errors import BudgetExceededError, GovernanceError, RouteNotAuthorizedError

    err = BudgetExceededError("department 'risk' has $0.10 left", scope="department", name="risk",
                              spent_usd=49.9, reserved_usd=0.0, limit_usd=50.0)
    assert isinstance(err, litellm.BudgetExceededError) and isinstance(err, GovernanceError)
    assert isinstance(err, tidyllm.TidyLLMError)
    assert err.max_budget == 50.0 and str(err) == "department 'risk' has $0.10 left"
    assert isinstance(RouteNotAuthorizedError("no", rule="r1"), tidyllm.TidyLLMError)
    assert tidyllm.BudgetExceededError is BudgetExceededError


def test_litellm_offline_default_and_override() -> None:
    base = {"PATH": "/usr/bin:/bin"}
    code = ("import os; from tidyllm._litellm import import_litellm; import_litellm(); "
            "print(os.environ['LITELLM_LOCAL_MODEL_COST_MAP'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=base)
    assert out.stdout.strip().endswith("True")  # tidyllm's default when the user set nothing
    # a user's own choice is kept (an explicit local-map value, so the test needs no network)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**base, "LITELLM_LOCAL_MODEL_COST_MAP": "true"})
    assert out.stdout.strip().endswith("true")
