"""Settings from the environment and the shared flags: typed add-on folders (ControlNet, T2I-Adapter,
IP-Adapter), each settable from a flag, a STUDIO_* variable and the UI, the flag winning."""

from __future__ import annotations

from pathlib import Path

from studio.cli import build_parser
from studio.flags import settings_from_args
from studio.server import build_parser as server_parser
from studio.settings import AddOns, Settings


def test_add_ons_come_from_the_environment_then_the_flags(tmp_path):
    env = {"STUDIO_IP_ADAPTER": str(tmp_path / "ip"), "STUDIO_T2I_ADAPTER": str(tmp_path / "t2i")}
    args = build_parser().parse_args(["generate", "x", "--default-controlnet", str(tmp_path / "cn"),
                                      "--ip-adapter", str(tmp_path / "ip2")])
    add_ons = settings_from_args(args, env).add_ons
    assert add_ons == AddOns(controlnet=tmp_path / "cn", t2i_adapter=tmp_path / "t2i", ip_adapter=tmp_path / "ip2")
    assert Settings.from_env({}).add_ons == AddOns()  # nothing configured


def test_the_server_takes_the_same_add_on_flags(tmp_path):
    args = server_parser().parse_args(["--ip-adapter", str(tmp_path / "ip")])
    assert settings_from_args(args, {}).add_ons.ip_adapter == tmp_path / "ip"


def test_a_request_field_of_the_same_name_stays_the_requests(tmp_path):
    """sketch has a per-request --controlnet; the studio-wide default is --default-controlnet."""
    args = build_parser().parse_args(
        ["sketch", "x", "--control-image", "s.png", "--controlnet", "request-cn", "--default-controlnet", "studio-cn"]
    )
    assert args.controlnet == "request-cn"
    assert settings_from_args(args, {}).add_ons.controlnet == Path("studio-cn")
