"""The gateway routes file: both formats, tidyllm's fields, validation messages, translation for MLflow."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tidyllm.errors import GatewayConfigError, GatewayError
from tidyllm.gateway.client import api_base, auth_headers, embeddings_api_base, resolve_auth
from tidyllm.gateway.config import PROVIDER_CONFIG_KEYS, Price, load_gateway_config
from tidyllm.gateway.sync import server_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "tidyllm" / "examples_data" / "gateway.yaml"

SEED = """
routes:
  - name: bedrock-claude
    route_type: llm/v1/chat
    group: chat
    model:
      provider: bedrock
      name: anthropic.claude-3-5-sonnet-20241022-v2:0
      config:
        aws_access_key_id: $AWS_ACCESS_KEY_ID
        aws_secret_access_key: $AWS_SECRET_ACCESS_KEY
        aws_region: us-east-1
    price:
      - {input_per_1m: 3.0, output_per_1m: 15.0, effective: 2025-01-01}
      - {input_per_1m: 2.5, output_per_1m: 12.0, effective: 2025-07-01}
    tags: [on_prem]
    sensitivity: [public, internal, confidential]
  - name: azure-gpt4
    route_type: llm/v1/chat
    group: chat
    model:
      provider: azure
      name: gpt-4
      config:
        azure_api_key: $AZURE_OPENAI_KEY
        azure_api_base: https://corporate-azure.openai.azure.com
        azure_api_version: "2024-02-01"
    price: {input_per_1m: 10, output_per_1m: 30, effective: "2025-02-01"}
    tags: {region: eu, tier: premium}
    limit: {calls: 100, renewal_period: minute}
    weight: 2
    fallbacks: [bedrock-claude]
  - name: local-llama
    route_type: llm/v1/chat
    model:
      provider: openai
      name: llama-3.1-8b
      config:
        openai_api_key: $VLLM_KEY
        openai_api_base: $VLLM_URL
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def route(**overrides: Any) -> dict[str, Any]:
    """One valid seed-format route, with fields replaced or (value None) removed."""
    base: dict[str, Any] = {
        "name": "chat-a",
        "route_type": "llm/v1/chat",
        "model": {"provider": "openai", "name": "gpt-4o-mini",
                  "config": {"openai_api_key": "$OPENAI_API_KEY"}},
        "price": {"input_per_1m": 0.15, "output_per_1m": 0.6, "effective": "2025-01-01"},
    }
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def test_seed_format_loads_with_tidyllm_fields(tmp_path: Path) -> None:
    cfg = load_gateway_config(write(tmp_path, SEED))
    assert [r.name for r in cfg.routes] == ["bedrock-claude", "azure-gpt4", "local-llama"]
    bedrock, azure, local = cfg.routes
    assert bedrock.endpoint_type == "llm/v1/chat" and bedrock.provider == "bedrock"
    assert bedrock.model_name == "anthropic.claude-3-5-sonnet-20241022-v2:0"
    assert bedrock.config["aws_secret_access_key"] == "$AWS_SECRET_ACCESS_KEY"  # raw, reference kept
    assert bedrock.tags == {"on_prem": "true"}
    assert bedrock.sensitivity == ("public", "internal", "confidential")
    assert azure.tags == {"region": "eu", "tier": "premium"}
    assert azure.prices == (Price(10.0, 30.0, dt.date(2025, 2, 1)),)
    assert azure.limit is not None and (azure.limit.calls, azure.limit.renewal_period) == (100, "minute")
    assert azure.weight == 2.0 and azure.fallbacks == ("bedrock-claude",)
    # undeclared: the default classes, without confidential; undeclared group: its own name
    assert local.sensitivity == ("public", "internal") and local.group == "local-llama"
    assert {g: [r.name for r in rs] for g, rs in cfg.groups().items()} == {
        "chat": ["bedrock-claude", "azure-gpt4"], "local-llama": ["local-llama"]}
    assert cfg.route("azure-gpt4") is azure
    with pytest.raises(GatewayConfigError, match="no route named 'nope'.*bedrock-claude"):
        cfg.route("nope")


def test_prices_are_effective_dated(tmp_path: Path) -> None:
    bedrock = load_gateway_config(write(tmp_path, SEED)).route("bedrock-claude")
    assert bedrock.price_at(dt.date(2024, 12, 31)) is None
    assert bedrock.price_at(dt.date(2025, 3, 1)).input_per_1m == 3.0
    assert bedrock.price_at(dt.datetime(2025, 7, 1, 0, 0)).output_per_1m == 12.0
    assert bedrock.price_at().input_cost_per_token == pytest.approx(2.5e-6)


def test_secret_refs_and_check_secrets(tmp_path: Path) -> None:
    cfg = load_gateway_config(write(tmp_path, SEED))
    assert cfg.secret_refs() == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AZURE_OPENAI_KEY", "VLLM_KEY"}
    assert cfg.env_refs() == cfg.secret_refs() | {"VLLM_URL"}
    env = {v: "x" for v in cfg.env_refs()}
    cfg.check_secrets(env)
    del env["VLLM_KEY"]
    with pytest.raises(GatewayConfigError) as info:
        cfg.check_secrets(env)
    message = str(info.value)
    assert str(tmp_path / "gateway.yaml") in message and "'local-llama'" in message
    assert "$VLLM_KEY" in message and "openai_api_key" in message


def test_legacy_yaml_keeps_secret_references_and_substitutes_plain_values(tmp_path: Path) -> None:
    cfg = load_gateway_config(write(tmp_path, SEED))
    env = {"AWS_ACCESS_KEY_ID": "AKIA-secret-id", "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
           "AZURE_OPENAI_KEY": "azure-secret-value", "VLLM_KEY": "vllm-secret-value",
           "VLLM_URL": "http://10.0.0.5:8000/v1"}
    path = cfg.to_mlflow_yaml(tmp_path / "mlflow.yaml", env)
    text = path.read_text()
    for secret in ("AKIA-secret-id", "aws-secret-value", "azure-secret-value", "vllm-secret-value"):
        assert secret not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = yaml.safe_load(text)
    by_name = {e["name"]: e for e in data["endpoints"]}
    assert by_name["local-llama"]["model"]["config"] == {"openai_api_key": "$VLLM_KEY",
                                                         "openai_api_base": "http://10.0.0.5:8000/v1"}
    # the seed's Azure keys become MLflow 3's
    assert by_name["azure-gpt4"]["model"]["config"] == {
        "openai_api_key": "$AZURE_OPENAI_KEY", "openai_api_base": "https://corporate-azure.openai.azure.com",
        "openai_api_version": "2024-02-01", "openai_api_type": "azure", "openai_deployment_name": "gpt-4"}
    assert by_name["azure-gpt4"]["limit"] == {"calls": 100, "renewal_period": "minute"}
    # MLflow resolves $VAR only in API-key fields: Bedrock keys go to boto3 through the environment
    assert by_name["bedrock-claude"]["model"]["config"] == {"aws_config": {"aws_region": "us-east-1"}}
    assert cfg.legacy_environment(env) == {"AWS_ACCESS_KEY_ID": "AKIA-secret-id",
                                           "AWS_SECRET_ACCESS_KEY": "aws-secret-value"}
    with pytest.raises(GatewayConfigError, match=r"'local-llama'.*\$VLLM_URL, which is not set"):
        cfg.to_mlflow_dict({k: v for k, v in env.items() if k != "VLLM_URL"})


def test_mlflow_accepts_the_translation(tmp_path: Path) -> None:
    """MLflow's own loader (what `mlflow gateway start` runs) validates what tidyllm writes."""
    from mlflow.gateway.config import _load_gateway_config

    text = SEED + """
  - name: chat-split
    destinations:
      - {name: azure-gpt4, traffic_percentage: 70}
      - {name: local-llama, traffic_percentage: 30}
"""
    cfg = load_gateway_config(write(tmp_path, text))
    assert cfg.splits[0].endpoint_type == "llm/v1/chat"  # taken from the destinations
    env = {v: "value" for v in cfg.env_refs()} | {"VLLM_URL": "http://127.0.0.1:8000/v1"}
    loaded = _load_gateway_config(cfg.to_mlflow_yaml(tmp_path / "mlflow.yaml", env))
    assert [e.name for e in loaded.endpoints] == ["bedrock-claude", "azure-gpt4", "local-llama"]
    assert loaded.routes[0].name == "chat-split"
    assert [(d.name, d.traffic_percentage) for d in loaded.routes[0].destinations] == [
        ("azure-gpt4", 70), ("local-llama", 30)]


def test_mlflow3_endpoints_format(tmp_path: Path) -> None:
    text = """
endpoints:
  - name: chat-a
    endpoint_type: llm/v1/chat
    model: {provider: anthropic, name: claude-3-5-haiku, config: {anthropic_api_key: $ANTHROPIC_API_KEY}}
    limit: {renewal_period: minute, calls: 10}
  - name: chat-b
    endpoint_type: llm/v1/chat
    model: {provider: amazon_bedrock, name: m, config: {aws_config: {aws_region: eu-west-1}}}
  - name: emb
    endpoint_type: llm/v1/embeddings
    model: {provider: ollama, name: nomic-embed-text, config: {api_base: "http://127.0.0.1:11434/v1"}}
routes:
  - name: split
    task_type: llm/v1/chat
    destinations: [{name: chat-a, traffic_percentage: 80}, {name: chat-b, traffic_percentage: 20}]
    routing_strategy: TRAFFIC_SPLIT
"""
    cfg = load_gateway_config(write(tmp_path, text))
    assert [r.name for r in cfg.routes] == ["chat-a", "chat-b", "emb"]
    assert cfg.route("chat-b").provider == "amazon-bedrock"  # MLflow's spelling, '-' or '_' accepted
    assert cfg.splits[0].destinations == (("chat-a", 80), ("chat-b", 20))
    assert cfg.route("emb").prices == ()
    assert cfg.to_mlflow_dict({"ANTHROPIC_API_KEY": "k"})["routes"][0]["task_type"] == "llm/v1/chat"


BAD = [
    ("unknown provider", route(model={"provider": "openia", "name": "m", "config": {}}),
     "unknown provider 'openia' in model.provider; MLflow supports: ai21labs"),
    ("missing model name", route(model={"provider": "openai", "config": {"openai_api_key": "k"}}),
     "missing field 'model.name'"),
    ("missing model", route(model=None), "missing field 'model'"),
    ("missing endpoint type", route(route_type=None), "missing field 'endpoint_type'"),
    ("bad endpoint type", route(route_type="llm/v2/chat"), "route_type 'llm/v2/chat' is not one of llm/v1/chat"),
    ("missing api key", route(model={"provider": "openai", "name": "m", "config": {}}),
     "missing field 'model.config.openai_api_key' for provider openai"),
    ("unknown config key", route(model={"provider": "openai", "name": "m",
                                        "config": {"openai_api_key": "k", "openai_api_bse": "x"}}),
     "unknown field 'model.config.openai_api_bse' for provider openai"),
    ("unknown route key", route(cost=3), "unknown field(s) cost; allowed:"),
    ("negative price", route(price={"input_per_1m": -1, "output_per_1m": 1}), "price.input_per_1m must be >= 0"),
    ("text price", route(price={"input_per_1m": "cheap", "output_per_1m": 1}),
     "price.input_per_1m must be a number, got 'cheap'"),
    ("bad price date", route(price={"input_per_1m": 1, "output_per_1m": 1, "effective": "2025-13-01"}),
     "price.effective must be a date like 2025-01-31"),
    ("missing output price", route(price={"input_per_1m": 1}), "missing field 'price.output_per_1m'"),
    ("unknown price key", route(price={"input_per_1m": 1, "output_per_1m": 1, "currency": "EUR"}),
     "unknown field(s) price.currency"),
    ("bad sensitivity", route(sensitivity=["secret"]), "sensitivity class 'secret' is not one of public"),
    ("bad tag", route(tags=["on prem"]), "tag 'on prem' must be a word"),
    ("bad limit", route(limit={"calls": 0, "renewal_period": "minute"}), "limit.calls must be a positive integer"),
    ("bad weight", route(weight=0), "weight must be positive"),
    ("self fallback", route(fallbacks=["chat-a"]), "fallbacks: a route cannot fall back to itself"),
    ("unknown fallback", route(fallbacks=["ghost"]), "fallbacks: unknown route 'ghost'"),
    ("bad reference", route(model={"provider": "openai", "name": "m", "config": {"openai_api_key": "$1KEY"}}),
     "model.config.openai_api_key: '$1KEY' is not a valid environment reference"),
    ("azure without version", route(model={"provider": "azure", "name": "gpt-4", "config": {
        "openai_api_key": "k", "openai_api_base": "https://x.openai.azure.com"}}),
     "missing field 'model.config.openai_api_version'"),
]


@pytest.mark.parametrize("bad,expected", [pytest.param(b, e, id=i) for i, b, e in BAD])
def test_bad_route_names_file_route_and_field(tmp_path: Path, bad: dict[str, Any], expected: str) -> None:
    path = write(tmp_path, yaml.safe_dump({"routes": [bad]}))
    with pytest.raises(GatewayConfigError) as info:
        load_gateway_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: route 'chat-a': "), message
    assert expected in message


def test_duplicate_names_and_bad_names(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump({"routes": [route(), route()]}))
    with pytest.raises(GatewayConfigError, match=f"^{path}: duplicate route name 'chat-a'"):
        load_gateway_config(path)
    with pytest.raises(GatewayConfigError, match=r"routes\[0\]: name 'chat a' may only contain letters"):
        load_gateway_config({"routes": [route(name="chat a")]})
    with pytest.raises(GatewayConfigError, match=r"routes\[0\]: missing field 'name'"):
        load_gateway_config({"routes": [route(name=None)]})


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match="cannot read gateway config"):
        load_gateway_config(tmp_path / "missing.yaml")
    with pytest.raises(GatewayConfigError, match="not valid YAML"):
        load_gateway_config(write(tmp_path, "routes: [\n"))
    with pytest.raises(GatewayConfigError, match="unknown top-level key"):
        load_gateway_config({"routes": [route()], "gateways": []})
    with pytest.raises(GatewayConfigError, match="no routes"):
        load_gateway_config({"routes": []})
    with pytest.raises(GatewayConfigError, match="no routes"):
        load_gateway_config({"endpoints": [], "routes": []})


def test_traffic_split_validation() -> None:
    other = route(name="chat-b")
    split = {"name": "split", "destinations": [{"name": "chat-a", "traffic_percentage": 60},
                                              {"name": "chat-b", "traffic_percentage": 30}]}
    with pytest.raises(GatewayConfigError, match="route 'split': traffic percentages add up to 90, not 100"):
        load_gateway_config({"routes": [route(), other, split]})
    split["destinations"][1] = {"name": "ghost", "traffic_percentage": 40}
    with pytest.raises(GatewayConfigError, match="route 'split': destinations: unknown route 'ghost'"):
        load_gateway_config({"routes": [route(), other, split]})
    with pytest.raises(GatewayConfigError, match="routing_strategy must be TRAFFIC_SPLIT"):
        load_gateway_config({"endpoints": [route()], "routes": [{**split, "routing_strategy": "FALLBACK"}]})


def test_legacy_refuses_a_secret_it_cannot_resolve() -> None:
    cfg = load_gateway_config({"routes": [route(model={"provider": "bedrock", "name": "m", "config": {
        "aws_bearer_token": "$BEDROCK_TOKEN", "aws_region": "us-east-1"}})]})
    with pytest.raises(GatewayConfigError, match=r"legacy gateway does not resolve \$BEDROCK_TOKEN.*--mode server"):
        cfg.to_mlflow_dict({"BEDROCK_TOKEN": "t"})


def test_legacy_gives_boto3_one_set_of_credentials() -> None:
    def bedrock(name: str, key_var: str) -> dict[str, Any]:
        return route(name=name, model={"provider": "bedrock", "name": "m", "config": {
            "aws_access_key_id": f"${key_var}", "aws_secret_access_key": "$AWS_SECRET_ACCESS_KEY"}})

    cfg = load_gateway_config({"routes": [bedrock("a", "KEY_A"), bedrock("b", "KEY_B")]})
    with pytest.raises(GatewayConfigError, match="only one set of AWS credentials"):
        cfg.legacy_environment({"KEY_A": "1", "KEY_B": "2", "AWS_SECRET_ACCESS_KEY": "s"})


def test_provider_table_matches_installed_mlflow() -> None:
    """tidyllm keeps a copy of MLflow's provider config schema; fail when MLflow changes it."""
    from mlflow.gateway.config import Provider
    from mlflow.gateway.provider_registry import provider_registry

    assert set(PROVIDER_CONFIG_KEYS) == Provider.values()
    for provider, (required, optional) in PROVIDER_CONFIG_KEYS.items():
        fields = provider_registry.get(Provider(provider)).CONFIG_TYPE.model_fields
        assert {n for n, f in fields.items() if f.is_required()} == required, provider
        assert {n for n, f in fields.items() if not f.is_required()} == optional, provider


def test_server_spec_translates_providers() -> None:
    cfg = load_gateway_config({"routes": [
        route(name="oa", model={"provider": "openai", "name": "gpt-4o", "config": {
            "openai_api_key": "$OPENAI_API_KEY", "openai_api_base": "$BASE"}}),
        route(name="az", model={"provider": "azure", "name": "gpt-4", "config": {
            "azure_api_key": "$AZ", "azure_api_base": "https://x.openai.azure.com", "azure_api_version": "2024-02-01"}}),
        route(name="br", model={"provider": "bedrock", "name": "anthropic.claude", "config": {
            "aws_access_key_id": "$AK", "aws_secret_access_key": "$SK", "aws_region": "us-east-1"}}),
        route(name="role", model={"provider": "bedrock", "name": "anthropic.claude", "config": {
            "aws_config": {"aws_role_arn": "arn:aws:iam::1:role/r", "aws_region": "eu-west-1"}}}),
        route(name="co", model={"provider": "litellm", "name": "command-r", "config": {
            "litellm_provider": "cohere", "litellm_auth_config": {"api_key": "$CO"}}}),
        route(name="tgi", model={"provider": "huggingface-text-generation-inference", "name": "m",
                                 "config": {"hf_server_url": "http://h"}}),
    ]})
    env = {"OPENAI_API_KEY": "sk-1", "BASE": "http://127.0.0.1:9/v1", "AZ": "az-1", "AK": "ak", "SK": "sk",
           "CO": "co-1"}
    oa = server_spec(cfg, cfg.route("oa"), env)
    assert (oa.provider, oa.model_name, dict(oa.secret), dict(oa.auth_config)) == (
        "openai", "gpt-4o", {"api_key": "sk-1"}, {"api_base": "http://127.0.0.1:9/v1"})
    assert "sk-1" not in repr(oa)
    az = server_spec(cfg, cfg.route("az"), env)
    assert az.provider == "openai" and az.auth_config == {
        "api_type": "azure", "api_base": "https://x.openai.azure.com", "deployment_name": "gpt-4",
        "api_version": "2024-02-01"}
    br = server_spec(cfg, cfg.route("br"), env)
    assert (br.provider, dict(br.secret), dict(br.auth_config)) == (
        "bedrock", {"aws_access_key_id": "ak", "aws_secret_access_key": "sk"},
        {"auth_mode": "access_keys", "aws_region_name": "us-east-1"})
    role = server_spec(cfg, cfg.route("role"), env)
    assert dict(role.auth_config) == {"auth_mode": "iam_role", "aws_role_name": "arn:aws:iam::1:role/r",
                                      "aws_region_name": "eu-west-1"}
    co = server_spec(cfg, cfg.route("co"), env)
    assert (co.provider, dict(co.secret), dict(co.auth_config)) == ("cohere", {"api_key": "co-1"}, {})
    with pytest.raises(GatewayConfigError, match="cannot provision provider 'huggingface-text-generation"):
        server_spec(cfg, cfg.route("tgi"), env)
    with pytest.raises(GatewayConfigError, match=r"route 'oa': model.config.openai_api_key references \$OPENAI_API_KEY"):
        server_spec(cfg, cfg.route("oa"), {})


def test_client_helpers() -> None:
    assert api_base("http://h:1/", "legacy") == "http://h:1/v1"
    assert api_base("http://h:1", "server") == "http://h:1/gateway/mlflow/v1"
    assert embeddings_api_base("http://h:1", "server") == "http://h:1/gateway/openai/v1"
    with pytest.raises(GatewayError, match="unknown gateway mode 'cloud'"):
        api_base("http://h:1", "cloud")
    assert auth_headers("ana", "pw") == {"X-MLflow-Authorization": "Basic YW5hOnB3"}
    from tidyllm.platform import GatewayHandle
    from tidyllm.settings import Settings

    # a plain SDK embedding call to the tracking server goes to its OpenAI passthrough: still the gateway
    server = GatewayHandle(Settings(gateway_uri="http://h:1/", gateway_mode="server"))
    assert server.api_bases() == ("http://h:1/gateway/mlflow/v1", "http://h:1/gateway/openai/v1")
    assert GatewayHandle(Settings(gateway_uri="http://h:1", gateway_mode="legacy")).api_bases() == ("http://h:1/v1",)
    assert GatewayHandle(Settings()).api_bases() == ()
    assert resolve_auth(environ={}) is None
    assert resolve_auth(environ={"MLFLOW_TRACKING_USERNAME": "ana", "MLFLOW_TRACKING_PASSWORD": "pw"}) == ("ana", "pw")
    assert resolve_auth("bob", "x", environ={"MLFLOW_TRACKING_USERNAME": "ana"}) == ("bob", "x")
    with pytest.raises(GatewayError, match="MLFLOW_TRACKING_PASSWORD is missing"):
        resolve_auth(environ={"MLFLOW_TRACKING_USERNAME": "ana"})


def test_bundled_example_points_at_the_simulator() -> None:
    from tidyllm.gateway.simulator import load_profiles

    cfg = load_gateway_config(EXAMPLE)
    assert {g: [r.name for r in rs] for g, rs in cfg.groups().items()} == {
        "chat": ["chat-large", "chat-small", "chat-claude", "chat-onprem"], "embed": ["embed"]}
    profiles = load_profiles()
    for r in cfg.routes:
        assert r.model_name in profiles and r.price_at() is not None
        assert r.config["openai_api_base"] == "$TIDYLLM_SIMULATOR_URL"
    onprem = cfg.route("chat-onprem")
    assert onprem.tags == {"on_prem": "true"} and "confidential" in onprem.sensitivity
    assert all("confidential" not in r.sensitivity for r in cfg.routes if r.name != "chat-onprem")
    assert cfg.route("embed").endpoint_type == "llm/v1/embeddings"


def test_loading_a_config_imports_neither_mlflow_nor_litellm() -> None:
    code = ("import sys; from tidyllm.gateway.config import load_gateway_config; "
            f"load_gateway_config({str(EXAMPLE)!r}); import tidyllm.gateway.client, tidyllm.gateway.sync, "
            "tidyllm.gateway.processes, tidyllm.cli.gateway; "
            "print(sorted(m for m in ('mlflow', 'litellm', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_real_provider_example_in_the_docs_translates_for_both_flavours() -> None:
    import re

    from mlflow.gateway.config import GatewayConfig as MlflowGatewayConfig

    docs = (Path(__file__).resolve().parents[1] / "docs" / "gateway.md").read_text()
    block = re.search(r"```yaml\n(routes:\n  - name: bedrock-claude.*?)```", docs, re.S)
    assert block is not None
    cfg = load_gateway_config(yaml.safe_load(block.group(1)))
    env = {var: "value" for var in cfg.env_refs()}
    MlflowGatewayConfig(**cfg.to_mlflow_dict(env))
    providers = {r.name: server_spec(cfg, r, env).provider for r in cfg.routes}
    assert providers == {"bedrock-claude": "bedrock", "azure-gpt4o": "openai", "anthropic-sonnet": "anthropic",
                         "openai-mini": "openai", "onprem-llama": "openai", "onprem-embed": "ollama"}
