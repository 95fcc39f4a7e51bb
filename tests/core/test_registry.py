"""The one registry: every configured name builds the objective or sampler it stands for, and the
names the configs and flags accept are exactly the registry's."""

from typing import get_args

import pytest
import torch

from sad3_megatron.core.diffusion_config import DiffusionConfig, ObjectiveName
from sad3_megatron.core.errors import Sad3Error
from sad3_megatron.core.objectives import AutoregressiveObjective, BlockDiffusionObjective
from sad3_megatron.core.registry import OBJECTIVES, SAMPLERS, build_objective, make_sampler, objective_entry
from sad3_megatron.core.samplers import SamplerName
from sad3_megatron.core.schedules import evaluation_schedule
from sad3_megatron.core.sedd import ScoreEntropyObjective


def test_the_registry_holds_every_accepted_name():
    assert set(OBJECTIVES) == set(get_args(ObjectiveName))
    assert set(SAMPLERS) == set(get_args(SamplerName))


@pytest.mark.parametrize(
    "objective,kind,block,autoregressive",
    [("sad3", BlockDiffusionObjective, 4, False), ("ar", AutoregressiveObjective, 1, True),
     ("sedd", ScoreEntropyObjective, 16, False)],
)  # fmt: skip
def test_each_objective_is_built_from_its_config(tiny, objective, kind, block, autoregressive):
    d = DiffusionConfig(objective=objective, block_size=4 if objective != "sedd" else 16)
    built = build_objective(d, 16, tiny.mask_id)
    assert type(built) is kind and built.block_size == block and built.autoregressive == autoregressive
    assert objective_entry(objective).autoregressive == autoregressive
    terms = built(tiny.network().eval(), tiny.tokens(2, 16), torch.Generator().manual_seed(0))
    assert torch.isfinite(terms.loss) and terms.num_tokens == 2 * 15  # position 0 is context for every objective


def test_a_schedule_and_block_size_can_be_given_at_build_time(tiny):
    built = build_objective(DiffusionConfig(block_size=4), 16, tiny.mask_id, block_size=8, schedule=evaluation_schedule())
    assert built.block_size == 8 and built.schedule == evaluation_schedule()


def test_every_sampler_name_builds_a_sampler_that_fills_a_block(tiny):
    network = tiny.network().eval()
    for name in SAMPLERS:
        sampler = make_sampler(name, steps=4, threshold=0.5)
        x = torch.full((2, 4), tiny.mask_id)
        with torch.no_grad():
            result = sampler.denoise_block(
                x, x == tiny.mask_id, lambda rows, x_t: network(x_t, torch.arange(4), None).logits,
                torch.Generator().manual_seed(0),
            )  # fmt: skip
        assert sampler.name == name and (result.tokens != tiny.mask_id).all() and (result.nfe >= 1).all()


def test_default_samplers_follow_the_objective():
    assert objective_entry("sedd").default_sampler == "euler" and objective_entry("sad3").default_sampler == "ancestral"


def test_unknown_names_are_one_line_errors():
    with pytest.raises(Sad3Error, match="unknown objective 'gpt'"):
        objective_entry("gpt")
    with pytest.raises(Sad3Error, match="unknown sampler 'psychic'"):
        make_sampler("psychic", 4)
