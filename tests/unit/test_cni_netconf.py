"""CNI protocol surface: env, network config, result and error JSON shapes."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from felix_lite.cni import netconf
from felix_lite.cni.netconf import AddResult, CniError, Command, ErrorCode
from policy.names import pod_interface


def conf(**over: Any) -> bytes:
    doc: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "felix-lite",
        "ipam": {"podCIDR": "10.244.1.0/24", "dataDir": "/tmp/x"},
    }
    doc.update(over)
    return json.dumps(doc).encode()


def code_of(fn: Any, *args: Any) -> tuple[ErrorCode, str]:
    with pytest.raises(CniError) as info:
        fn(*args)
    return info.value.code, info.value.msg


def test_parse_valid_config() -> None:
    c = netconf.parse_netconf(conf(mtu=1400, logLevel="debug"))
    assert c.name == "k8s-pod-network"
    assert c.ipam.pod_cidr == ipaddress.IPv4Network("10.244.1.0/24")
    assert c.ipam_dir == Path("/tmp/x/k8s-pod-network")
    assert c.mtu == 1400
    assert c.log_level == "DEBUG"
    assert c.prev_result is None


def test_subnet_alias_and_default_data_dir() -> None:
    c = netconf.parse_netconf(conf(ipam={"type": "felix-lite", "subnet": "10.1.0.0/16"}))
    assert c.ipam.pod_cidr == ipaddress.IPv4Network("10.1.0.0/16")
    assert c.ipam.data_dir == netconf.DEFAULT_DATA_DIR


@pytest.mark.parametrize(
    ("data", "code", "fragment"),
    [
        (b"{not json", ErrorCode.DECODE_FAILURE, "invalid JSON"),
        (b"[1, 2]", ErrorCode.DECODE_FAILURE, "JSON object"),
        (b"", ErrorCode.DECODE_FAILURE, "invalid JSON"),
        (conf(name=""), ErrorCode.INVALID_CONFIG, "name"),
        (conf(cniVersion="9.9.9"), ErrorCode.INCOMPATIBLE_VERSION, "9.9.9"),
        (conf(cniVersion=None), ErrorCode.INVALID_CONFIG, "cniVersion"),
        (conf(type="bridge"), ErrorCode.INVALID_CONFIG, "type"),
        (conf(ipam=None), ErrorCode.INVALID_CONFIG, "ipam"),
        (conf(ipam={"podCIDR": "10.244.1.1/24"}), ErrorCode.INVALID_CONFIG, "ipam.podCIDR"),
        (conf(ipam={"podCIDR": "fd00::/64"}), ErrorCode.INVALID_CONFIG, "ipam.podCIDR"),
        (conf(ipam={"subnet": "10.0.0.0/31"}), ErrorCode.INVALID_CONFIG, "ipam.subnet"),
        (
            conf(ipam={"type": "host-local", "subnet": "10.0.0.0/24"}),
            ErrorCode.UNSUPPORTED_FIELD,
            "ipam.type",
        ),
        (
            conf(ipam={"podCIDR": "10.0.0.0/24", "dataDir": "rel"}),
            ErrorCode.INVALID_CONFIG,
            "dataDir",
        ),
        (conf(mtu=70000), ErrorCode.INVALID_CONFIG, "mtu"),
        (conf(mtu=True), ErrorCode.INVALID_CONFIG, "mtu"),
        (conf(prevResult=[]), ErrorCode.INVALID_CONFIG, "prevResult"),
        (conf(logLevel="loud"), ErrorCode.INVALID_CONFIG, "logLevel"),
        (
            conf(**{"cni.dev/valid-attachments": [{"containerID": 1}]}),
            ErrorCode.INVALID_CONFIG,
            "valid-attachments[0]",
        ),
    ],
)
def test_bad_config_is_rejected_with_field(data: bytes, code: ErrorCode, fragment: str) -> None:
    got, msg = code_of(netconf.parse_netconf, data)
    assert got == code
    assert fragment in msg


def test_bad_config_message_names_network_and_field() -> None:
    _, msg = code_of(netconf.parse_netconf, conf(ipam={"podCIDR": "10.0.0.0/33"}))
    assert msg.startswith("netconf k8s-pod-network: ipam.podCIDR:")


def env(**over: str) -> dict[str, str]:
    base = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/p",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a",
        "CNI_PATH": "/opt/cni/bin",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v != "<unset>"}


def test_parse_env_add() -> None:
    e = netconf.parse_env(env())
    assert e.command is Command.ADD
    assert (e.pod_namespace, e.pod_name) == ("x", "a")
    assert e.host_ifname == pod_interface("x", "a")
    assert e.host_ifname.startswith("fl") and len(e.host_ifname) == 13


def test_host_ifname_without_k8s_args_keys_on_container() -> None:
    a = netconf.parse_env(env(CNI_ARGS=""))
    b = netconf.parse_env(env(CNI_ARGS="", CNI_CONTAINERID="other"))
    assert a.host_ifname != b.host_ifname
    assert len(a.host_ifname) == 13


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"CNI_COMMAND": "<unset>"}, "CNI_COMMAND"),
        ({"CNI_COMMAND": "FROB"}, "CNI_COMMAND"),
        ({"CNI_NETNS": "<unset>"}, "CNI_NETNS"),
        ({"CNI_CONTAINERID": "<unset>"}, "CNI_CONTAINERID"),
        ({"CNI_CONTAINERID": "../etc"}, "CNI_CONTAINERID"),
        ({"CNI_IFNAME": "a-very-long-interface"}, "CNI_IFNAME"),
        ({"CNI_IFNAME": "eth/0"}, "CNI_IFNAME"),
        ({"CNI_ARGS": "K8S_POD_NAME"}, "CNI_ARGS[0]"),
    ],
)
def test_bad_env(over: dict[str, str], fragment: str) -> None:
    code, msg = code_of(netconf.parse_env, env(**over))
    assert code == ErrorCode.INVALID_ENV
    assert fragment in msg


def test_del_needs_no_netns_and_version_needs_nothing() -> None:
    assert netconf.parse_env(env(CNI_COMMAND="DEL", CNI_NETNS="<unset>")).netns == ""
    assert netconf.parse_env({"CNI_COMMAND": "VERSION"}).command is Command.VERSION


RESULT = AddResult(
    host_ifname="fl0123456789a",
    host_mac="aa:bb:cc:dd:ee:ff",
    container_ifname="eth0",
    container_mac="11:22:33:44:55:66",
    sandbox="/var/run/netns/p",
    address=ipaddress.IPv4Address("10.244.1.7"),
)


def test_result_shape_1_0() -> None:
    out = netconf.render_result(RESULT, "1.0.0")
    assert out["cniVersion"] == "1.0.0"
    host, ctr = out["interfaces"]
    assert "sandbox" not in host and host["name"] == "fl0123456789a"
    assert ctr == {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/var/run/netns/p"}
    assert out["ips"] == [{"address": "10.244.1.7/32", "gateway": "169.254.1.1", "interface": 1}]
    assert out["interfaces"][out["ips"][0]["interface"]]["name"] == "eth0"
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert out["dns"] == {}
    json.dumps(out)


def test_result_shape_pre_1_0_has_ip_version() -> None:
    out = netconf.render_result(RESULT, "0.4.0")
    assert out["ips"][0]["version"] == "4"
    assert "version" not in netconf.render_result(RESULT, "1.1.0")["ips"][0]


def test_error_json_shape() -> None:
    err = CniError(
        ErrorCode.IP_EXHAUSTED, "ipam: no free address in pod CIDR 10.0.0.0/29", "6 of 6"
    )
    assert err.to_json("1.0.0") == {
        "cniVersion": "1.0.0",
        "code": 100,
        "msg": "ipam: no free address in pod CIDR 10.0.0.0/29",
        "details": "6 of 6",
    }
    assert "details" not in CniError(ErrorCode.TRY_AGAIN, "busy").to_json()


def test_version_result_lists_versions() -> None:
    out = netconf.version_result("1.0.0")
    assert out["cniVersion"] == "1.0.0"
    assert {"0.4.0", "1.0.0", "1.1.0"} <= set(out["supportedVersions"])
