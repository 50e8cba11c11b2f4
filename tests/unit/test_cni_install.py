"""install-cni: the launcher, the conflist (accepted by our own plugin), chaining,
the runtime copy, the Node pod CIDR wait. Temp dirs only; no root needed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from felix_lite.cni import install, netconf
from felix_lite.config import parse_config


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    b, c = tmp_path / "bin", tmp_path / "net.d"
    b.mkdir(parents=True)
    c.mkdir(parents=True)
    return b, c


def _plan(tmp_path: Path, **kw: object) -> install.InstallPlan:
    b, c = _dirs(tmp_path)
    base: dict[str, object] = {
        "bin_dir": b,
        "conf_dir": c,
        "conf_name": "10-felix-lite.conflist",
        "pod_cidr": "10.244.3.0/24",
        "ipam_data_dir": "/var/lib/felix-lite/ipam",
        "log_level": "info",
    }
    base.update(kw)
    return install.InstallPlan(**base)  # type: ignore[arg-type]


def _plugin_confs(doc: dict[str, object]) -> list[bytes]:
    """What libcni hands each plugin: its entry plus the list's name and cniVersion."""
    plugins = doc["plugins"]
    assert isinstance(plugins, list)
    return [
        json.dumps({"cniVersion": doc["cniVersion"], "name": doc["name"], **p}).encode()
        for p in plugins
    ]


def test_conflist_is_accepted_by_the_plugin_parser(tmp_path: Path) -> None:
    plan = _plan(tmp_path, pod_cidr="10.244.7.0/24", log_level="debug", mtu=1450)
    res = install.install(plan)
    doc = json.loads(res.conflist.read_text())
    assert doc["cniVersion"] in netconf.SUPPORTED_VERSIONS
    assert [p["type"] for p in doc["plugins"]] == ["felix-lite"]
    conf = netconf.parse_netconf(_plugin_confs(doc)[0])
    assert str(conf.ipam.pod_cidr) == "10.244.7.0/24"
    assert conf.mtu == 1450
    assert conf.log_level == "DEBUG"
    assert str(conf.ipam.data_dir) == "/var/lib/felix-lite/ipam"


def test_chained_plugins_follow_felix_lite(tmp_path: Path) -> None:
    plan = _plan(tmp_path, chain_portmap=True, chain_bandwidth=True)
    (plan.bin_dir / "portmap").write_bytes(b"host portmap")
    (plan.bin_dir / "bandwidth").write_bytes(b"host bandwidth")
    doc = json.loads(install.install(plan).conflist.read_text())
    assert [p["type"] for p in doc["plugins"]] == ["felix-lite", "portmap", "bandwidth"]
    assert doc["plugins"][1]["capabilities"] == {"portMappings": True}
    assert doc["plugins"][2]["capabilities"] == {"bandwidth": True}
    # The host's own binaries are kept.
    assert (plan.bin_dir / "portmap").read_bytes() == b"host portmap"


def test_missing_chained_plugin_is_copied_from_plugins_src(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "portmap").write_bytes(b"image portmap")
    plan = _plan(tmp_path, chain_portmap=True, plugins_src=src)
    install.install(plan)
    dst = plan.bin_dir / "portmap"
    assert dst.read_bytes() == b"image portmap"
    assert os.access(dst, os.X_OK)


def test_missing_chained_plugin_without_source_names_the_setting(tmp_path: Path) -> None:
    plan = _plan(tmp_path, chain_bandwidth=True)
    with pytest.raises(install.InstallError, match=r"cni\.chainBandwidth: plugin 'bandwidth'"):
        install.install(plan)
    # Fails before the conflist: the node must not turn Ready with a broken chain.
    assert not (plan.conf_dir / plan.conf_name).exists()


def test_missing_host_dir_is_named(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    plan.bin_dir.rmdir()
    with pytest.raises(install.InstallError, match=r"--host-bin-dir .*not a directory"):
        install.install(plan)


def test_second_run_changes_nothing_and_leaves_no_temp_files(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    first = install.install(plan)
    assert set(first.changed) == {str(first.launcher), str(first.conflist)}
    mtime = first.conflist.stat().st_mtime_ns
    again = install.install(plan)
    assert again.changed == ()
    assert first.conflist.stat().st_mtime_ns == mtime
    leftovers = [p.name for d in (plan.bin_dir, plan.conf_dir) for p in d.iterdir()]
    assert sorted(leftovers) == ["10-felix-lite.conflist", "felix-lite"]


def test_changed_setting_rewrites_the_conflist(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    install.install(plan)
    res = install.install(_replace(plan, pod_cidr="10.244.9.0/24"))
    assert res.changed == (str(res.conflist),)
    assert json.loads(res.conflist.read_text())["plugins"][0]["ipam"]["podCIDR"] == "10.244.9.0/24"


def _replace(plan: install.InstallPlan, **kw: object) -> install.InstallPlan:
    from dataclasses import replace

    return replace(plan, **kw)  # type: ignore[arg-type]


def test_launcher_runs_the_plugin(tmp_path: Path) -> None:
    """The written launcher is a real executable answering CNI VERSION."""
    res = install.install(_plan(tmp_path))
    mode = res.launcher.stat().st_mode
    assert mode & stat.S_IXUSR and mode & stat.S_IXOTH
    out = subprocess.run(
        [str(res.launcher)],
        input=b'{"cniVersion": "1.0.0"}',
        env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
        timeout=60,
    )
    doc = json.loads(out.stdout)
    assert doc["cniVersion"] == "1.0.0"
    assert set(netconf.SUPPORTED_VERSIONS) <= set(doc["supportedVersions"])


def test_launcher_rejects_a_bad_conf_through_the_plugin(tmp_path: Path) -> None:
    res = install.install(_plan(tmp_path))
    out = subprocess.run(
        [str(res.launcher)],
        input=b'{"cniVersion": "1.0.0", "name": "n", "type": "bridge"}',
        env={
            "CNI_COMMAND": "DEL",
            "CNI_CONTAINERID": "abc",
            "CNI_IFNAME": "eth0",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert json.loads(out.stdout)["code"] == int(netconf.ErrorCode.INVALID_CONFIG)


def _fake_prefix(root: Path, marker: str) -> Path:
    """A stand-in Python prefix: bin/python3 that proves which copy ran."""
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "include").mkdir()
    (root / "include" / "big.h").write_text("x")
    py = root / "bin" / "python3"
    py.write_text(f'#!/bin/sh\necho {marker} "$LD_LIBRARY_PATH" "$@"\n')
    py.chmod(0o755)
    return root


def test_runtime_is_copied_versioned_and_launched(tmp_path: Path) -> None:
    src = _fake_prefix(tmp_path / "prefix", "copied-runtime")
    rdir = tmp_path / "runtime"
    res = install.install(_plan(tmp_path, runtime_src=src, runtime_dir=rdir))
    assert res.runtime is not None and res.runtime.parent == rdir
    assert not (res.runtime / "include").exists()  # headers are not needed on the host
    out = subprocess.run(
        [str(res.launcher)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert out.split() == [
        "copied-runtime",
        str(res.runtime / "lib"),
        "-I",
        "-m",
        "felix_lite.cni.plugin",
    ]
    # Unchanged source: no second copy.
    again = install.install(_plan(tmp_path / "again", runtime_src=src, runtime_dir=rdir))
    assert again.runtime == res.runtime
    assert [p.name for p in rdir.iterdir()] == [res.runtime.name]


def test_new_runtime_keeps_the_previous_one_only(tmp_path: Path) -> None:
    src = _fake_prefix(tmp_path / "prefix", "v")
    rdir = tmp_path / "runtime"
    seen = []
    for i in range(3):
        (src / "lib" / f"mod{i}.py").write_text(str(i))
        res = install.install(_plan(tmp_path / f"n{i}", runtime_src=src, runtime_dir=rdir))
        assert res.runtime is not None
        seen.append(res.runtime.name)
    assert len(set(seen)) == 3
    assert sorted(p.name for p in rdir.iterdir()) == sorted(seen[1:])


def test_runtime_src_must_be_a_prefix(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    plan = _plan(tmp_path, runtime_src=empty, runtime_dir=tmp_path / "r")
    with pytest.raises(install.InstallError, match=r"--runtime-src .*not a Python prefix"):
        install.install(plan)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def __call__(self) -> float:
        return self.now


def test_wait_pod_cidr_polls_until_allocated() -> None:
    answers = iter([RuntimeError("connection refused"), "", "10.244.2.0/24"])
    asked: list[str] = []

    def lookup(node: str) -> str:
        asked.append(node)
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    clock = _Clock()
    cidr = install.wait_pod_cidr("node-2", lookup, timeout=60, sleep=clock.sleep, clock=clock)
    assert cidr == "10.244.2.0/24"
    assert asked == ["node-2"] * 3
    assert clock.sleeps == [1.0, 2.0]


def test_wait_pod_cidr_gives_up_naming_the_field() -> None:
    clock = _Clock()
    with pytest.raises(install.InstallError, match=r"node n1: spec\.podCIDR: still empty"):
        install.wait_pod_cidr("n1", lambda _n: "", timeout=30, sleep=clock.sleep, clock=clock)
    assert clock.now >= 30


def test_wait_pod_cidr_rejects_garbage() -> None:
    with pytest.raises(install.InstallError, match=r"spec\.podCIDR: 'fd00::/64'"):
        install.wait_pod_cidr("n1", lambda _n: "fd00::/64", timeout=1)


def test_wait_pod_cidr_needs_a_node_name() -> None:
    with pytest.raises(install.InstallError, match="NODE_NAME"):
        install.wait_pod_cidr("", lambda _n: "10.0.0.0/24", timeout=1)


def _config_file(tmp_path: Path, doc: dict[str, object]) -> Path:
    parse_config(doc)  # the test's own input must be a valid settings document
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_main_reads_settings_and_looks_up_the_node(tmp_path: Path) -> None:
    b, c = _dirs(tmp_path)
    cfg = _config_file(
        tmp_path,
        {"logLevel": "warning", "cni": {"confName": "05-fl.conflist", "ipamDataDir": "/x/ipam"}},
    )
    asked: list[str] = []

    def lookup(node: str) -> str:
        asked.append(node)
        return "10.244.5.0/24"

    rc = install.main(
        ["--config", str(cfg), "--host-bin-dir", str(b), "--host-conf-dir", str(c)],
        env={"NODE_NAME": "worker-5"},
        lookup=lookup,
    )
    assert rc == 0
    assert asked == ["worker-5"]
    doc = json.loads((c / "05-fl.conflist").read_text())
    assert doc["plugins"][0]["ipam"] == {"podCIDR": "10.244.5.0/24", "dataDir": "/x/ipam"}
    assert doc["plugins"][0]["logLevel"] == "warning"


def test_main_uses_node_pod_cidr_from_settings_without_lookup(tmp_path: Path) -> None:
    b, c = _dirs(tmp_path)
    cfg = _config_file(tmp_path, {"nodePodCIDR": "10.9.0.0/24"})

    def lookup(node: str) -> str:
        raise AssertionError("no lookup expected")

    rc = install.main(
        ["--config", str(cfg), "--bin-dir", str(b), "--conf-dir", str(c)], env={}, lookup=lookup
    )
    assert rc == 0
    doc = json.loads((c / "10-felix-lite.conflist").read_text())
    assert doc["plugins"][0]["ipam"]["podCIDR"] == "10.9.0.0/24"


def test_main_reports_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b, c = _dirs(tmp_path)
    p = tmp_path / "config.yaml"
    p.write_text("iptablesBackend: nftables\n")
    rc = install.main(
        ["--config", str(p), "--host-bin-dir", str(b), "--host-conf-dir", str(c)], env={}
    )
    assert rc == 1
    assert "iptablesBackend" in capsys.readouterr().err
    assert list(c.iterdir()) == []


def test_module_entry_point_runs(tmp_path: Path) -> None:
    """`python -m felix_lite.cni.install` as the init container runs it."""
    b, c = _dirs(tmp_path)
    argv = ["--host-bin-dir", str(b), "--host-conf-dir", str(c), "--node-pod-cidr", "10.1.0.0/24"]
    out = subprocess.run(
        [sys.executable, "-m", "felix_lite.cni.install", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "cni.install.done" in out.stderr
    assert (b / "felix-lite").exists()
    assert (c / "10-felix-lite.conflist").exists()


def test_main_rejects_a_bad_mtu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b, c = _dirs(tmp_path)
    argv = ["--host-bin-dir", str(b), "--host-conf-dir", str(c), "--node-pod-cidr", "10.1.0.0/24"]
    assert install.main([*argv, "--mtu", "100"], env={}) == 1
    assert "--mtu: must be 576..65535" in capsys.readouterr().err
    assert list(c.iterdir()) == []
