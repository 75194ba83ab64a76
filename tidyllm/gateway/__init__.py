"""MLflow AI Gateway integration: routes config, gateway processes, the provider simulator, the Router."""
