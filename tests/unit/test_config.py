"""The agent settings file: defaults, round trip, and errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from felix_lite.config import AgentConfig, ConfigError, load_config, parse_config, to_yaml_dict


def test_defaults_and_round_trip() -> None:
    cfg = AgentConfig()
    assert parse_config(to_yaml_dict(cfg)) == cfg
    custom = parse_config(
        {
            "nodeName": "node-7",
            "iptablesBackend": "nft",
            "logLevel": "DEBUG",
            "podCIDRs": ["10.244.0.0/16", "10.96.0.1/12"],
            "cni": {"chainPortmap": True},
            "bgp": {"routerID": "192.0.2.7"},
        }
    )
    assert custom.log_level == "debug"
    assert custom.pod_cidrs == ("10.244.0.0/16", "10.96.0.0/12")  # host bits masked
    assert custom.cni.chain_portmap is True
    assert parse_config(to_yaml_dict(custom)) == custom


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"iptablesBackend": "iptables"}, "iptablesBackend: must be one of auto, legacy, nft"),
        ({"healthPort": 0}, "healthPort: must be a port number"),
        ({"metricsPort": "9091"}, "metricsPort: must be a port number"),
        ({"podCIDRs": []}, "podCIDRs: must be a non-empty list"),
        ({"podCIDRs": ["10.0.0.0/33"]}, "podCIDRs[0]: not an IPv4 CIDR"),
        ({"nodePodCIDR": "banana"}, "nodePodCIDR: not an IPv4 CIDR"),
        ({"cni": {"binDirr": "/x"}}, "cni.binDirr: unknown setting"),
        ({"cni": {"chainPortmap": "yes"}}, "cni.chainPortmap: must be true or false"),
        ({"bgp": []}, "bgp: must be a mapping"),
        ({"logLevel": "loud"}, "logLevel: must be one of"),
        ({"resyncSeconds": -1}, "resyncSeconds: must be a number >= 0"),
        ({"nodname": "x"}, "nodname: unknown setting"),
    ],
)
def test_errors_name_the_field(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as exc:
        parse_config(raw, source="config test.yaml")
    assert str(exc.value).startswith("config test.yaml: ")
    assert message in str(exc.value)


def test_load_config_file_and_node_name_from_env(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("iptablesBackend: legacy\n")
    cfg = load_config(f, env={"NODE_NAME": "node-3"})
    assert (cfg.iptables_backend, cfg.node_name) == ("legacy", "node-3")
    assert load_config(None, env={}).node_name == ""
    with pytest.raises(ConfigError, match=r"no-such\.yaml"):
        load_config(tmp_path / "no-such.yaml", env={})
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml", env={})
