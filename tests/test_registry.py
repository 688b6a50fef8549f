"""Decoders are found by name through stevedore; built-ins are entry points like a third party's."""

from __future__ import annotations

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
    with pytest.raises(
        registry.PluginLoadError,
        match=r"decoder broken = third_party_decoders:NotADecoder, from third-party-decoders 1.0: .* is not a subclass of mtp_plugins.decoding.Decoder",
    ):
        generate(ToyMTP(), torch.tensor([[3, 4, 5]]), strategy="broken", k=4, max_new_tokens=2)
    with pytest.raises(
        registry.PluginLoadError,
        match=r"decoder missing = third_party_decoders:Missing, from third-party-decoders 1.0: failed to load: AttributeError",
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


def test_listing_reports_broken_plugins_with_their_distribution(plugin_dist):
    plugin_dist(
        "half_broken",
        """
        import torch
        from mtp_plugins.decoding import Decoder
        from mtp_plugins.losses import Loss

        class Fine(Decoder):
            def select(self, proposals):
                return torch.ones_like(proposals.valid)

        class OldLoss(Loss):
            api_version = 0
        """,
        """
        [mtp_plugins.decoders]
        fine = half_broken:Fine
        gone = no_such_module:Thing
        [mtp_plugins.losses]
        old = half_broken:OldLoss
        """,
        dist="half-broken",
    )
    statuses = {(s.entry.group, s.entry.name): s for s in registry.list_plugins()}
    assert statuses[(registry.DECODERS, "fine")].ok
    gone = statuses[(registry.DECODERS, "gone")]
    assert not gone.ok and gone.entry.distribution == "half-broken"
    assert "gone = no_such_module:Thing, from half-broken 1.0: failed to load: ModuleNotFoundError" in gone.error
    assert "implements loss API 0; this mtp-plugins speaks API 1" in statuses[(registry.LOSSES, "old")].error
    # The built-ins are all listed and fine.
    for group, name in [(registry.LOSSES, "soft-kl"), (registry.DECODERS, "confadapt"), (registry.HOOKS, "metrics-file")]:
        assert statuses[(group, name)].ok and statuses[(group, name)].entry.distribution == "mtp-plugins"


def test_two_distributions_registering_one_name_is_an_error_naming_both(plugin_dist):
    plugin_dist(
        "copycat",
        "from mtp_plugins.decoding.strategies import Static as ConfAdapt\n",
        "[mtp_plugins.decoders]\nconfadapt = copycat:ConfAdapt\n",
        dist="copycat-decoders",
    )
    with pytest.raises(registry.PluginConflictError) as info:
        registry.load_decoder("confadapt")
    message = str(info.value)
    assert "decoder name 'confadapt' is registered by more than one distribution" in message
    assert "copycat-decoders 1.0 (copycat:ConfAdapt)" in message and "mtp-plugins" in message
    assert registry.load_decoder("ar") is strategies.AutoRegressive  # other names are unaffected
    listed = [s for s in registry.list_plugins() if s.entry.name == "confadapt"]
    assert len(listed) == 2 and all("more than one distribution" in s.error for s in listed)


def test_a_decoder_keeps_per_row_state_by_row_index(plugin_dist):
    plugin_dist(
        "stateful",
        """
        import torch
        from mtp_plugins.decoding import Decoder

        SEEN = []

        class EvenRowsTakeTwo(Decoder):
            def start(self, batch_size, device):
                self.passes = torch.zeros(batch_size, dtype=torch.long)
                SEEN.append(("start", batch_size))

            def select(self, proposals):
                rows = torch.tensor(proposals.row_index)
                self.passes[rows] += 1
                SEEN.append(list(proposals.row_index))
                two = torch.where(rows % 2 == 0, 2, 1)
                return two.minimum(proposals.valid)
        """,
        "[mtp_plugins.decoders]\neven-two = stateful:EvenRowsTakeTwo\n",
        dist="stateful-decoders",
    )
    import stateful

    prompts = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11]])
    out = generate(ToyMTP(), prompts, strategy="even-two", k=3, max_new_tokens=8, eos_token_id=[])
    assert stateful.SEEN[0] == ("start", 3)
    # Rows 0 and 2 emit 2 per pass and finish after 4 passes; row 1 goes on alone, keeping its index.
    assert stateful.SEEN[1:5] == [[0, 1, 2]] * 4 and stateful.SEEN[5:] == [[1]] * 4
    assert [r.tokens_per_pass for r in out.stats.rows] == [[2] * 4, [1] * 8, [2] * 4]


def test_a_decoder_receives_its_declared_options(plugin_dist):
    plugin_dist(
        "optioned",
        """
        import torch
        from mtp_plugins.decoding import Decoder

        class EmitN(Decoder):
            options = {"n": 1}

            def select(self, proposals):
                return torch.full_like(proposals.valid, self.n).minimum(proposals.valid)
        """,
        "[mtp_plugins.decoders]\nemit-n = optioned:EmitN\n",
        dist="optioned-decoders",
    )
    prompts = torch.tensor([[3, 4, 5]])
    default = generate(ToyMTP(), prompts, strategy="emit-n", k=4, max_new_tokens=6, eos_token_id=[])
    three = generate(ToyMTP(), prompts, strategy="emit-n", k=4, max_new_tokens=6, eos_token_id=[],
                     decoder_options={"n": 3})
    assert default.stats.rows[0].tokens_per_pass == [1] * 6
    assert three.stats.rows[0].tokens_per_pass == [3, 3]
    with pytest.raises(ValueError, match=r"decoder EmitN has no option\(s\) m; its options: n"):
        generate(ToyMTP(), prompts, strategy="emit-n", k=4, decoder_options={"m": 2})
