"""Decoders are found by name through stevedore; built-ins are entry points like a third party's."""

from __future__ import annotations

import textwrap

import pytest
import torch
from toy import ToyMTP

from mtp_plugins import generate, registry
from mtp_plugins.decoding import strategies


def test_builtins_are_entry_points():
    assert registry.plugin_names(registry.DECODERS) == ["ar", "confadapt", "static", "verify"]
    assert registry.load_decoder("ar") is strategies.AutoRegressive
    assert registry.load_decoder("verify") is strategies.Verify


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("statik", "unknown decoder 'statik'; did you mean 'static'? available: ar, confadapt, static, verify"),
        ("", "unknown decoder ''"),
        ("zzz", "unknown decoder 'zzz' available: ar, confadapt, static, verify"),
    ],
)
def test_unknown_names_list_what_is_available(name, message):
    with pytest.raises(registry.UnknownPluginError) as info:
        registry.load_decoder(name)
    assert str(info.value) == message or message in str(info.value)


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """Install a third-party decoder distribution onto sys.path (a module and its dist-info)."""

    def install(module: str, module_source: str, entry_points: str) -> None:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(module_source))
        info = tmp_path / "third_party_decoders-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-decoders\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
        monkeypatch.syspath_prepend(str(tmp_path))
        registry.refresh()

    yield install
    monkeypatch.undo()
    registry.refresh()


def test_a_third_party_decoder_is_used_by_name(plugin_dist):
    plugin_dist(
        "third_party_decoders",
        """
        import torch
        from mtp_plugins.decoding import Decoder

        class EmitTwo(Decoder):
            def select(self, proposals):
                return torch.full_like(proposals.valid, 2).minimum(proposals.valid)

        class NotADecoder:
            pass
        """,
        """
        [mtp_plugins.decoders]
        emit-two = third_party_decoders:EmitTwo
        broken = third_party_decoders:NotADecoder
        missing = third_party_decoders:Missing
        """,
    )
    assert "emit-two" in registry.plugin_names(registry.DECODERS)
    out = generate(ToyMTP(), torch.tensor([[3, 4, 5]]), strategy="emit-two", k=4, max_new_tokens=9, eos_token_id=[])
    assert out.stats.rows[0].tokens_per_pass == [2, 2, 2, 2, 1]
    with pytest.raises(TypeError, match="decoder 'broken' .* is not a subclass of mtp_plugins.decoding.Decoder"):
        generate(ToyMTP(), torch.tensor([[3, 4, 5]]), strategy="broken", k=4, max_new_tokens=2)
    with pytest.raises(
        registry.PluginLoadError,
        match=r"decoder 'missing' \(third_party_decoders:Missing, from third-party-decoders 1.0\) failed to load: AttributeError",
    ):
        generate(ToyMTP(), torch.tensor([[3, 4, 5]]), strategy="missing", k=4, max_new_tokens=2)
    # The others keep working.
    assert registry.load_decoder("confadapt") is strategies.ConfAdapt


def test_a_decoder_choosing_out_of_range_counts_is_stopped(plugin_dist):
    plugin_dist(
        "third_party_greedy",
        """
        import torch
        from mtp_plugins.decoding import Decoder

        class Greedy(Decoder):
            def select(self, proposals):
                return proposals.valid + 1
        """,
        "[mtp_plugins.decoders]\ngreedy-too-much = third_party_greedy:Greedy\n",
    )
    with pytest.raises(RuntimeError, match="decoder 'greedy-too-much' chose to emit 5 proposals; it must choose 1..4"):
        generate(ToyMTP(), torch.tensor([[3, 4, 5]]), strategy="greedy-too-much", k=4, max_new_tokens=9)
